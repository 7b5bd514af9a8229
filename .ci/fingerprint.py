"""Print the installed bnfast's bit fingerprint (tests/test_simd_paths.py) as JSON.

    python .ci/fingerprint.py > bits.json
    BNFAST_BITS_REFERENCE=bits.json pytest tests/test_simd_paths.py   # with another build
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_simd_paths  # noqa: E402

json.dump(test_simd_paths.fingerprint(), sys.stdout, indent=0, sort_keys=True)
