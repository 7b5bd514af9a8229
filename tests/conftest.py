"""Test configuration: hypothesis profiles.

"ci" (the default): derandomized (a fixed seed, so every run tests the same examples),
a bounded number of examples and no deadline (shared, slow CI machines).
"dev": more, random examples. Pick one with HYPOTHESIS_PROFILE=dev or
``pytest --hypothesis-profile=dev``.
"""
import os

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:          # hypothesis is a test extra; tests that need it skip
    settings = None

if settings is not None:
    settings.register_profile(
        "ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    settings.register_profile(
        "dev", max_examples=500, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def threads_on_small_arrays():
    """Let small arrays start threads (one per 1024 elements, not per 65536), so that a
    test's threads > 1 cases run the threaded paths on arrays it can afford; the work
    units, and so the bits, do not depend on it."""
    from bnfast import _core

    old = _core._set_par_min_elems(1024)
    try:
        yield
    finally:
        _core._set_par_min_elems(old)
