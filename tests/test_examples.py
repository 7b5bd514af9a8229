"""The examples in examples/ run and check themselves (folded == unfolded output)."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import bnfast

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serve_mlp_bnfast_training():
    res = _load("serve_mlp").main(["--steps", "25"])
    assert len(res["losses"]) == 25 and np.all(np.isfinite(res["losses"]))
    assert np.mean(res["losses"][-5:]) < res["losses"][0]   # it learned something
    assert res["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_serve_mlp_refuses_no_training_steps(steps, capsys):
    with pytest.raises(SystemExit) as e:
        _load("serve_mlp").main(["--steps", steps])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_serve_mlp_from_torch():
    pytest.importorskip("torch")
    res = _load("serve_mlp").main(["--torch", "--steps", "10"])
    assert res["max_abs_diff"] < 1e-4 and res["max_abs_diff_torch"] < 1e-4


def test_serve_mlp_folding_is_exact_enough():
    """The folded serving path equals a float64 NumPy evaluation of the unfolded model."""
    m = _load("serve_mlp")
    rng = np.random.default_rng(3)
    model, _, _ = m.train_bnfast(rng, 5)
    x, _ = m.make_data(rng, 64)
    h = x.astype(np.float64)
    for (w, b), bn in zip(model.linears[:-1], model.norms):
        z = h @ w.T.astype(np.float64) + b
        z = ((z - bn.running_mean.astype(np.float64))
             / np.sqrt(bn.running_var.astype(np.float64) + bn.eps) * bn.weight + bn.bias)
        h = np.maximum(z, 0)
    w, b = model.linears[-1]
    ref = h @ w.T.astype(np.float64) + b
    np.testing.assert_allclose(m.serve(m.fold(model), x), ref, rtol=1e-4, atol=1e-5)


def test_serve_mlp_as_script(tmp_path):
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    env["PYTHONPATH"] = where + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "serve_mlp.py"), "--steps", "3"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "folded vs unfolded" in r.stdout
