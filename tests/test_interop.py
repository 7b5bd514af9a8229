"""Interop: from_torch, save/load, from_onnx, from_keras, fold_linear/fold_conv.

Each converter is checked against the peer's own objects and runtime (torch modules,
ONNX Runtime on models built with onnx.helper, Keras layers), not against bnfast.
Optional peers are skipped with pytest.importorskip when missing.
"""
import io
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import bnfast

RNG = np.random.default_rng(20240611)


def _rand_state(c, rng, dtype=np.float32):
    return {
        "weight": rng.uniform(0.5, 2.0, c).astype(dtype),
        "bias": rng.normal(size=c).astype(dtype),
        "running_mean": rng.normal(size=c).astype(dtype),
        "running_var": rng.uniform(0.5, 3.0, c).astype(dtype),
    }


def _np_bn_eval(x, mean, var, w, b, eps, axis):
    """float64 NumPy reference of inference batch norm."""
    x = np.asarray(x, np.float64)
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda a: np.asarray(a, np.float64).reshape(shape)  # noqa: E731
    return (x - r(mean)) / np.sqrt(r(var) + eps) * r(w) + r(b)


# =======================================================================================
# import hygiene
# =======================================================================================
def test_import_does_not_pull_peers(tmp_path):
    code = ("import sys, bnfast, bnfast.interop\n"
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'keras', 'tensorflow') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = dict(os.environ)
    # the bnfast this test session imported (installed or in-place build)
    where = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    env["PYTHONPATH"] = where + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


# =======================================================================================
# PyTorch
# =======================================================================================
torch_cases = [
    # (torch class name, bnfast class, input shape)
    ("BatchNorm1d", bnfast.BatchNorm1d, (6, 4)),
    ("BatchNorm1d", bnfast.BatchNorm1d, (5, 4, 3)),
    ("BatchNorm2d", bnfast.BatchNorm2d, (3, 4, 3, 2)),
    ("BatchNorm3d", bnfast.BatchNorm3d, (2, 4, 2, 2, 3)),
    ("SyncBatchNorm", bnfast.BatchNorm, (3, 4, 5)),
]


@pytest.mark.parametrize("tname,bcls,shape", torch_cases)
@pytest.mark.parametrize("momentum,affine,track", [
    (0.1, True, True), (None, True, True), (0.3, False, True), (0.1, True, False),
    (None, False, False)])
def test_from_torch_matches_torch(tname, bcls, shape, momentum, affine, track):
    torch = pytest.importorskip("torch")
    seed = zlib.crc32(repr((tname, shape, momentum, affine, track)).encode())
    rng = np.random.default_rng(seed)
    c = shape[1]
    tm = getattr(torch.nn, tname)(c, eps=1e-4, momentum=momentum, affine=affine,
                                  track_running_stats=track)
    with torch.no_grad():
        if affine:
            tm.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
            tm.bias.copy_(torch.from_numpy(rng.normal(size=c).astype(np.float32)))
        for _ in range(3):  # some training history: running stats, num_batches_tracked
            tm(torch.from_numpy((rng.normal(size=shape) * 3 + 2).astype(np.float32)))

    bn = bnfast.from_torch(tm)
    assert type(bn) is bcls
    assert bn.num_features == c and bn.eps == pytest.approx(1e-4, rel=0, abs=0)
    assert bn.momentum == momentum and bn.affine == affine
    assert bn.track_running_stats == track and bn.axis == 1 and bn.training
    assert bn.dtype == np.float32 and bn.unbiased_running_var
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(np.asarray(bn.state_dict()[k]), v.numpy(), err_msg=k)
    if track:
        assert bn.num_batches_tracked == 3

    # two more training steps on both, then eval: same outputs and running stats
    for _ in range(2):
        x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
        y_t = tm(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(bn(x), y_t, rtol=1e-5, atol=1e-5)
    for k, v in tm.state_dict().items():
        np.testing.assert_allclose(np.asarray(bn.state_dict()[k]), v.numpy(),
                                   rtol=1e-6, atol=1e-6, err_msg=k)
    tm.eval()
    bn.eval()
    x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
    np.testing.assert_allclose(bn(x), tm(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_from_torch_copies_eval_state_and_does_not_share():
    torch = pytest.importorskip("torch")
    tm = torch.nn.BatchNorm2d(3).eval()
    bn = bnfast.from_torch(tm)
    assert bn.training is False
    with torch.no_grad():
        tm.running_mean.fill_(5.0)
        tm.weight.fill_(7.0)
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(bn.weight, np.ones(3, np.float32))


@pytest.mark.parametrize("tdtype,ndtype", [("float64", np.float64), ("float32", np.float32),
                                           ("float16", np.float32), ("bfloat16", np.float32)])
def test_from_torch_dtype(tdtype, ndtype):
    torch = pytest.importorskip("torch")
    tm = torch.nn.BatchNorm1d(3).to(getattr(torch, tdtype))
    st = _rand_state(3, np.random.default_rng(1), np.float64)
    with torch.no_grad():
        for k, v in st.items():
            getattr(tm, k).copy_(torch.from_numpy(v))
    bn = bnfast.from_torch(tm)
    assert bn.dtype == ndtype and bn.running_var.dtype == ndtype
    want = tm.running_var.to(torch.float64).numpy()
    np.testing.assert_array_equal(bn.running_var, want.astype(ndtype))


def test_from_torch_rejects_other_objects():
    torch = pytest.importorskip("torch")
    for obj in (torch.nn.LayerNorm(3), torch.nn.InstanceNorm2d(3), torch.nn.Linear(2, 3),
                np.zeros(3), "BatchNorm1d", bnfast.BatchNorm(3)):
        with pytest.raises(TypeError, match="BatchNorm"):
            bnfast.from_torch(obj)
    with pytest.raises(ValueError, match="uninitialized"):
        bnfast.from_torch(torch.nn.LazyBatchNorm1d())
    lazy = torch.nn.LazyBatchNorm1d()
    lazy(torch.randn(4, 5))  # materialized: becomes a BatchNorm1d
    assert bnfast.from_torch(lazy).num_features == 5


def test_from_torch_subclass():
    torch = pytest.importorskip("torch")

    class MyBN(torch.nn.BatchNorm2d):
        pass

    assert type(bnfast.from_torch(MyBN(2))) is bnfast.BatchNorm2d


@pytest.mark.parametrize("tname,bcls,shape", [torch_cases[0], torch_cases[2]])
def test_from_torch_track_running_stats_turned_off(tmp_path, tname, bcls, shape):
    """track_running_stats set to False after construction keeps the buffers: torch uses
    them in eval and neither uses nor updates them in training; so must the layer."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    c = shape[1]
    tm = getattr(torch.nn, tname)(c, momentum=0.2)
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
        tm.bias.copy_(torch.from_numpy(rng.normal(size=c).astype(np.float32)))
        for _ in range(3):
            tm(torch.from_numpy((rng.normal(size=shape) * 3 + 2).astype(np.float32)))
    tm.track_running_stats = False
    bn = bnfast.from_torch(tm)
    assert type(bn) is bcls and bn.track_running_stats is False and bn.training
    assert list(bn.state_dict()) == list(tm.state_dict())

    x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()                 # training: batch stats
    np.testing.assert_allclose(bn(x), y_t, rtol=1e-5, atol=1e-5)
    for k, v in tm.state_dict().items():                      # buffers left unchanged
        np.testing.assert_array_equal(np.asarray(bn.state_dict()[k]), v.numpy(), err_msg=k)
    assert bn.num_batches_tracked == 3

    tm.eval()
    bn.eval()
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()                 # eval: the buffers
    np.testing.assert_allclose(bn(x), y_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.freeze()(x), y_t, rtol=1e-5, atol=1e-5)
    w = rng.normal(size=(c, 2))
    np.testing.assert_array_equal(bnfast.fold_linear(w, None, bn)[0],
                                  bnfast.fold_linear(w, None, bn.freeze())[0])
    bn2 = bnfast.load(bn.save(tmp_path / "off.npz"))          # save/load keep them
    assert bn2.track_running_stats is False
    np.testing.assert_array_equal(bn2(x), bn(x))
    np.testing.assert_array_equal(bn2.running_var, bn.running_var)


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16", "float64"])
def test_load_state_dict_from_torch_dtypes(tdtype):
    """load_state_dict reads every torch float dtype, as from_torch does."""
    torch = pytest.importorskip("torch")
    tm = torch.nn.BatchNorm1d(3).to(getattr(torch, tdtype))
    with torch.no_grad():
        for k, v in _rand_state(3, np.random.default_rng(2), np.float64).items():
            getattr(tm, k).copy_(torch.from_numpy(v))
        tm.num_batches_tracked.fill_(7)
    bn = bnfast.BatchNorm1d(3)
    bn.load_state_dict(tm.state_dict())
    for k, v in tm.state_dict().items():
        want = v.to(torch.float64).numpy().astype(np.float32)
        np.testing.assert_array_equal(np.asarray(bn.state_dict()[k]), want, err_msg=k)
    assert bn.num_batches_tracked == 7


def test_load_state_dict_unconvertible_tensor_names_the_key():
    torch = pytest.importorskip("torch")
    bn = bnfast.BatchNorm1d(3)
    bad = {**torch.nn.BatchNorm1d(3).state_dict(),
           "weight": torch.full((3,), 2.0), "bias": torch.empty(3, device="meta")}
    with pytest.raises(TypeError, match=r"state_dict\['bias'\]"):
        bn.load_state_dict(bad)
    np.testing.assert_array_equal(bn.weight, 1.0)                # nothing written


# =======================================================================================
# save / load
# =======================================================================================
save_configs = [
    dict(cls=bnfast.BatchNorm, kw=dict(axis=-1), shape=(7, 3)),
    dict(cls=bnfast.BatchNorm, kw=dict(momentum=None, axis=-1, dtype=np.float64,
                                       unbiased_running_var=False), shape=(5, 2, 3)),
    dict(cls=bnfast.BatchNorm1d, kw=dict(affine=False, eps=1e-3), shape=(6, 3)),
    dict(cls=bnfast.BatchNorm2d, kw=dict(track_running_stats=False), shape=(2, 3, 2, 2)),
    dict(cls=bnfast.BatchNorm3d, kw=dict(momentum=0.25), shape=(2, 3, 2, 1, 2)),
]


@pytest.mark.parametrize("cfg", save_configs, ids=lambda c: c["cls"].__name__)
@pytest.mark.parametrize("training", [True, False])
def test_save_load_roundtrip(tmp_path, cfg, training):
    rng = np.random.default_rng(3)
    bn = cfg["cls"](3, **cfg["kw"])
    if bn.affine:
        bn.weight[:] = rng.uniform(0.5, 2, 3)
        bn.bias[:] = rng.normal(size=3)
    for _ in range(2):
        bn(rng.normal(size=cfg["shape"]) * 2 + 1)
    bn.train(training)
    path = bn.save(tmp_path / "layer.npz")
    assert path == str(tmp_path / "layer.npz") and os.path.exists(path)
    with np.load(path, allow_pickle=False) as f:  # the file needs no pickle
        assert "config.class" in f.files
    bn2 = bnfast.load(path)
    assert type(bn2) is type(bn)
    for a in ("num_features", "eps", "momentum", "affine", "track_running_stats", "axis",
              "dtype", "unbiased_running_var", "training", "num_batches_tracked"):
        assert getattr(bn2, a) == getattr(bn, a), a
    for k, v in bn.state_dict().items():
        v2 = bn2.state_dict()[k]
        assert np.asarray(v2).dtype == np.asarray(v).dtype, k
        np.testing.assert_array_equal(v2, v, err_msg=k)
    x = rng.normal(size=cfg["shape"])
    np.testing.assert_array_equal(bn2(x), bn(x))  # also continues training identically
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(bn2.state_dict()[k], v, err_msg=k)


def test_save_appends_suffix_and_file_objects(tmp_path):
    bn = bnfast.BatchNorm(2, momentum=None)
    p = bn.save(str(tmp_path / "noext"))
    assert p.endswith("noext.npz") and os.path.exists(p)
    buf = io.BytesIO()
    bnfast.interop.save_layer(bn, buf)
    buf.seek(0)
    assert bnfast.load(buf).momentum is None


def test_save_format_version_2_only_for_statistics_no_longer_tracked(tmp_path):
    """A layer whose track_running_stats was turned off after construction keeps its
    statistics; its file says version 2, which a reader of version 1 refuses by name
    instead of building the layer without them. Every other layer stays version 1."""
    bn = bnfast.BatchNorm(2, dtype=np.float64)
    bn(np.array([[1.0, 2.0], [3.0, 5.0]]))
    assert int(np.load(bn.save(tmp_path / "a.npz"))["format_version"]) == 1
    bn.track_running_stats = False
    p = bn.save(tmp_path / "b.npz")
    assert int(np.load(p)["format_version"]) == 2
    back = bnfast.load(p)
    assert back.track_running_stats is False
    np.testing.assert_array_equal(back.running_mean, bn.running_mean)
    bad = dict(np.load(p))
    bad["format_version"] = np.array(3)
    np.savez(tmp_path / "c.npz", **bad)
    with pytest.raises(ValueError, match="format version 3"):
        bnfast.load(tmp_path / "c.npz")


def _saved_layer_arrays(tmp_path):
    """The arrays of a saved BatchNorm(2), to edit into foreign files."""
    with np.load(bnfast.BatchNorm(2).save(tmp_path / "good.npz")) as f:
        return dict(f)


def _load_refused(tmp_path, arrays, match):
    """A file of `arrays` is refused by load with a ValueError matching `match`."""
    path = tmp_path / "edited.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        bnfast.load(path)


def test_load_refuses_pickles_and_foreign_files(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, **{"config.class": np.array([object()], dtype=object)})
    with pytest.raises(ValueError):
        bnfast.load(p)
    p2 = tmp_path / "other.npz"
    np.savez(p2, a=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        bnfast.load(p2)
    d = _saved_layer_arrays(tmp_path)
    d["config.class"] = np.array("os.system")
    _load_refused(tmp_path, d, "unknown layer class")
    d["config.class"] = np.array("BatchNorm")
    d["state.running_var"] = np.ones(5, np.float32)
    _load_refused(tmp_path, d, "running_var")
    with pytest.raises(TypeError):
        bnfast.interop.save_layer(object(), tmp_path / "x.npz")


@pytest.mark.parametrize("key,value", [
    ("config.axis", np.array(1.5)), ("config.num_features", np.array(2.5)),
    ("config.num_features", np.array(np.nan)), ("format_version", np.array(1.5)),
    ("config.axis", np.array([1])), ("config.affine", np.array(2)),
    ("config.training", np.array(0.5)), ("config.track_running_stats", np.array("yes")),
    ("config.eps", np.array([1e-5, 1e-5])), ("config.eps", np.array("small")),
    ("config.momentum", np.array([0.1])), ("config.dtype", np.array("foo")),
])
def test_load_refuses_edited_config_fields(tmp_path, key, value):
    d = _saved_layer_arrays(tmp_path)
    d[key] = value
    np.savez(tmp_path / "edited.npz", **d)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        bnfast.load(tmp_path / "edited.npz")
    d[key] = np.array(2.0) if key == "config.num_features" else None
    if d[key] is not None:               # a float holding a whole number loads
        np.savez(tmp_path / "whole.npz", **d)
        assert bnfast.load(tmp_path / "whole.npz").num_features == 2


def test_save_load_from_torch(tmp_path):
    torch = pytest.importorskip("torch")
    tm = torch.nn.BatchNorm1d(4, momentum=None)
    tm(torch.randn(8, 4) * 3 + 1)
    tm.eval()
    bn = bnfast.load(bnfast.from_torch(tm).save(tmp_path / "t.npz"))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(bn(x), tm(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert bn.momentum is None and bn.num_batches_tracked == 1 and not bn.training


# =======================================================================================
# ONNX
# =======================================================================================
def _ort_session(model):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


IR_FOR_OPSET = {1: 3, 6: 3, 7: 3, 9: 4, 14: 7, 15: 8}


def _opset15_model(graph):
    """An opset-15 model of `graph`, which the ONNX checker accepts in full."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _onnx_bn_model(opset, x_shape, *, x_type="float32", param_type="float32",
                   stat_type="float32", eps=(1e-5, 1e-3), attrs=None, legacy_inputs=False,
                   rng=None):
    """Two BatchNormalization nodes on the same input: 'bn_named' (initializers) and an
    unnamed one (Constant nodes) whose key is its output 'y_const'."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    rng = rng or np.random.default_rng(opset)
    c = x_shape[1]
    tp = {"float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE,
          "float16": onnx.TensorProto.FLOAT16}
    params = {}
    for tag in ("a", "b"):
        st = _rand_state(c, rng, np.float64)
        st["running_mean"] += 50.0  # price-like offset
        params[tag] = st
    def arr(tag, key):
        t = param_type if key in ("weight", "bias") else stat_type
        return params[tag][key].astype(t)
    keys = ("weight", "bias", "running_mean", "running_var")
    inits = [numpy_helper.from_array(arr("a", k), f"a_{k}") for k in keys]
    consts = [helper.make_node("Constant", [], [f"b_{k}"],
                               value=numpy_helper.from_array(arr("b", k), f"b_{k}_v"))
              for k in keys]
    attrs = dict(attrs or {})
    n1 = helper.make_node("BatchNormalization", ["x"] + [f"a_{k}" for k in keys], ["y_named"],
                          name="bn_named", epsilon=eps[0], **attrs)
    n2 = helper.make_node("BatchNormalization", ["x"] + [f"b_{k}" for k in keys], ["y_const"],
                          epsilon=eps[1], **attrs)
    dyn = [None] + list(x_shape[1:])
    inputs = [helper.make_tensor_value_info("x", tp[x_type], dyn)]
    if legacy_inputs:  # IR < 4: initializers are listed among the graph inputs
        inputs += [helper.make_tensor_value_info(i.name, tp[param_type if "weight" in i.name
                                                           or "bias" in i.name else stat_type],
                                                 [c]) for i in inits]
    outputs = [helper.make_tensor_value_info(o, tp[x_type], dyn) for o in ("y_named", "y_const")]
    graph = helper.make_graph(consts + [n1, n2], "bn_graph", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    onnx.checker.check_model(model)
    return model, params


@pytest.mark.parametrize("opset,attrs,legacy", [
    (7, {"spatial": 1, "momentum": 0.8}, True),
    (7, {}, True),
    (9, {"momentum": 0.7}, False),
    (14, {"training_mode": 0}, False),
    (15, {}, False),
])
@pytest.mark.parametrize("x_shape", [(5, 3), (2, 3, 4), (2, 3, 3, 2)])
def test_from_onnx_matches_onnxruntime(opset, attrs, legacy, x_shape):
    model, params = _onnx_bn_model(opset, x_shape, attrs=attrs, legacy_inputs=legacy)
    sess = _ort_session(model)
    layers = bnfast.from_onnx(model)
    assert list(layers) == ["bn_named", "y_const"]
    assert all(isinstance(v, bnfast.FrozenBatchNorm) for v in layers.values())
    assert layers["bn_named"].eps == 1e-5 and layers["y_const"].eps == 1e-3
    assert layers["bn_named"].axis == 1
    x = (RNG.normal(size=x_shape) + 50.0).astype(np.float32)
    y_named, y_const = sess.run(None, {"x": x})
    # ONNX Runtime computes in float32 (x*a + b form): a few float32 ulps of 50
    np.testing.assert_allclose(layers["bn_named"](x), y_named, rtol=0, atol=2e-4)
    np.testing.assert_allclose(layers["y_const"](x), y_const, rtol=0, atol=2e-4)
    # and bnfast is exact against the float64 definition
    for key, tag, eps in (("bn_named", "a", 1e-5), ("y_const", "b", 1e-3)):
        p = params[tag]
        ref = _np_bn_eval(x, p["running_mean"].astype(np.float32),
                          p["running_var"].astype(np.float32), p["weight"].astype(np.float32),
                          p["bias"].astype(np.float32), eps, 1)
        np.testing.assert_allclose(layers[key](x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x_type,param_type,stat_type", [
    ("float16", "float32", "float32"),   # opset 15: separate types T, T1, T2
    ("float16", "float16", "float16"),
    ("float64", "float64", "float64"),
])
def test_from_onnx_opset15_types(x_type, param_type, stat_type):
    model, _ = _onnx_bn_model(15, (4, 3, 2), x_type=x_type, param_type=param_type,
                              stat_type=stat_type)
    sess = _ort_session(model)
    layers = bnfast.from_onnx(model)
    x = (RNG.normal(size=(4, 3, 2)) + 50.0).astype(x_type)
    y_named, y_const = sess.run(None, {"x": x})
    atol = 0.1 if x_type == "float16" else 1e-9
    for got, want in ((layers["bn_named"](x), y_named), (layers["y_const"](x), y_const)):
        assert got.dtype == np.dtype(x_type)
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=0, atol=atol)


def test_from_onnx_legacy_opsets_1_and_6():
    pytest.importorskip("onnx")
    # opset 1 (consumed_inputs, is_test), opset 6 (is_test): ONNX Runtime no longer runs
    # them, so compare against the float64 definition of the operator.
    for opset, attrs in ((1, {"consumed_inputs": [0, 0, 0, 1, 1], "is_test": 1,
                              "spatial": 1}),
                         (6, {"is_test": 1})):
        model, params = _onnx_bn_model(opset, (3, 3, 2), attrs=attrs, legacy_inputs=True)
        layers = bnfast.from_onnx(model)
        x = RNG.normal(size=(3, 3, 2)).astype(np.float32)
        p = params["a"]
        ref = _np_bn_eval(x, *(p[k].astype(np.float32) for k in
                               ("running_mean", "running_var", "weight", "bias")), 1e-5, 1)
        np.testing.assert_allclose(layers["bn_named"](x), ref, rtol=1e-6, atol=1e-6)
    # opset 6 without is_test is training mode (the attribute defaults to 0)
    model, _ = _onnx_bn_model(6, (3, 3, 2), legacy_inputs=True)
    with pytest.raises(ValueError, match="training mode"):
        bnfast.from_onnx(model)
    assert set(bnfast.from_onnx(model, training_nodes="running_stats")) == {
        "bn_named", "y_const"}


def test_from_onnx_spatial0_refused():
    pytest.importorskip("onnx")
    model, _ = _onnx_bn_model(7, (3, 3), attrs={"spatial": 0}, legacy_inputs=True)
    with pytest.raises(NotImplementedError, match="spatial=0"):
        bnfast.from_onnx(model)


def _training_model(opset):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    c = 3
    rng = np.random.default_rng(7)
    st = _rand_state(c, rng)
    keys = ("weight", "bias", "running_mean", "running_var")
    inits = [numpy_helper.from_array(st[k], k) for k in keys]
    if opset >= 14:
        outs, attrs = ["y", "rm", "rv"], {"training_mode": 1, "momentum": 0.9}
    else:
        outs, attrs = ["y", "rm", "rv", "sm", "sv"], {"momentum": 0.9}
    node = helper.make_node("BatchNormalization", ["x", *keys], outs, name="train_bn", **attrs)
    shape = [None, c, 4]
    vi = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)] + [
        helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [c]) for o in outs[1:]]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, shape)], vi, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    onnx.checker.check_model(model)
    return model, st


@pytest.mark.parametrize("opset", [9, 14])
def test_from_onnx_training_mode(opset):
    model, st = _training_model(opset)
    with pytest.raises(ValueError, match="training mode"):
        bnfast.from_onnx(model)
    frozen = bnfast.from_onnx(model, training_nodes="running_stats")["train_bn"]
    np.testing.assert_array_equal(frozen.mean, st["running_mean"].astype(np.float64))
    np.testing.assert_array_equal(frozen.var, st["running_var"].astype(np.float64))
    with pytest.raises(ValueError, match="training_nodes"):
        bnfast.from_onnx(model, training_nodes="maybe")
    # The conventions table: an ONNX training node (momentum m) is a bnfast layer with
    # momentum 1 - m and the biased (population) running variance.
    sess = _ort_session(model)
    x = (RNG.normal(size=(5, 3, 4)) * 2 + 3).astype(np.float32)
    y, rm, rv = sess.run(None, {"x": x})[:3]
    bn = bnfast.BatchNorm(3, eps=1e-5, momentum=1 - 0.9, unbiased_running_var=False)
    bn.load_state_dict({**st, "num_batches_tracked": 0})
    np.testing.assert_allclose(bn(x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-6, atol=1e-6)


def test_from_onnx_runtime_parameters_refused():
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    c = 2
    st = _rand_state(c, np.random.default_rng(0))
    f = onnx.TensorProto.FLOAT
    # 'var' is a runtime graph input (not an initializer)
    inits = [numpy_helper.from_array(st[k], k) for k in ("weight", "bias", "running_mean")]
    node = helper.make_node("BatchNormalization",
                            ["x", "weight", "bias", "running_mean", "var"], ["y"], name="bn")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", f, [None, c]),
                                        helper.make_tensor_value_info("var", f, [c])],
                          [helper.make_tensor_value_info("y", f, [None, c])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    with pytest.raises(ValueError, match=r"var.*runtime graph input"):
        bnfast.from_onnx(m)
    # the mean is computed by another node
    inits = [numpy_helper.from_array(st[k], k) for k in st]
    add = helper.make_node("Add", ["running_mean", "running_mean"], ["mean2"], name="adder")
    node = helper.make_node("BatchNormalization",
                            ["x", "weight", "bias", "mean2", "running_var"], ["y"])
    g = helper.make_graph([add, node], "g", [helper.make_tensor_value_info("x", f, [None, c])],
                          [helper.make_tensor_value_info("y", f, [None, c])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    with pytest.raises(ValueError, match="computed at run time by node 'adder'"):
        bnfast.from_onnx(m)


def test_from_onnx_path_bytes_identity_subgraph(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    model, _ = _onnx_bn_model(15, (2, 3))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for src in (path, str(path), model.SerializeToString(), open(path, "rb")):
        got = bnfast.from_onnx(src)
        assert list(got) == ["bn_named", "y_const"]
    with pytest.raises(TypeError):
        bnfast.from_onnx(12)

    # parameters through Identity, and a node inside an If branch using outer initializers
    c, f = 3, onnx.TensorProto.FLOAT
    st = _rand_state(c, np.random.default_rng(5))
    inits = [numpy_helper.from_array(v, k) for k, v in st.items()]
    ident = helper.make_node("Identity", ["running_var"], ["var_id"])
    inner = helper.make_node("BatchNormalization",
                             ["x", "weight", "bias", "running_mean", "var_id"], ["yi"],
                             name="inner_bn", epsilon=1e-2)
    then_g = helper.make_graph([inner], "then", [],
                               [helper.make_tensor_value_info("yi", f, [None, c])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["ye"])], "else", [],
                               [helper.make_tensor_value_info("ye", f, [None, c])])
    if_node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    g = helper.make_graph([ident, if_node], "g",
                          [helper.make_tensor_value_info("x", f, [None, c]),
                           helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", f, [None, c])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    layers = bnfast.from_onnx(m)
    assert list(layers) == ["inner_bn"]
    x = RNG.normal(size=(4, c)).astype(np.float32)
    y = _ort_session(m).run(None, {"x": x, "cond": np.array(True)})[0]
    np.testing.assert_allclose(layers["inner_bn"](x), y, rtol=1e-5, atol=1e-5)


def test_from_onnx_colliding_keys_are_numbered():
    """Unnamed nodes whose output names coincide (the branches of an If) or whose output
    is another node's name get "#1", "#2", ... in visiting order, instead of an error."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    c, f = 3, onnx.TensorProto.FLOAT
    rng = np.random.default_rng(11)
    inits = []
    for tag in ("then", "else"):
        inits += [numpy_helper.from_array(v, f"{tag}_{k}")
                  for k, v in _rand_state(c, rng).items()]

    def branch(tag):  # an unnamed node, the same output name in both branches
        node = helper.make_node("BatchNormalization", ["x"] + [
            f"{tag}_{k}" for k in ("weight", "bias", "running_mean", "running_var")], ["yb"])
        return helper.make_graph([node], tag, [],
                                 [helper.make_tensor_value_info("yb", f, [None, c])])

    if_node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"),
                               else_branch=branch("else"))
    g = helper.make_graph([if_node], "g",
                          [helper.make_tensor_value_info("x", f, [None, c]),
                           helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", f, [None, c])], inits)
    m = _opset15_model(g)
    layers = bnfast.from_onnx(m)
    assert list(layers) == ["yb", "yb#1"]
    assert list(bnfast.from_onnx(m)) == ["yb", "yb#1"]         # deterministic
    x = RNG.normal(size=(4, c)).astype(np.float32)
    sess = _ort_session(m)
    # the branches are visited in the If node's attribute order
    for key, attr in zip(["yb", "yb#1"], [a.name for a in if_node.attribute]):
        y = sess.run(None, {"x": x, "cond": np.array(attr == "then_branch")})[0]
        np.testing.assert_allclose(layers[key](x), y, rtol=1e-5, atol=1e-5, err_msg=key)

    # a node named "t", then an unnamed node whose output is "t"
    st = _rand_state(c, rng)
    inits = [numpy_helper.from_array(v, k) for k, v in st.items()]
    names = ["weight", "bias", "running_mean", "running_var"]
    n1 = helper.make_node("BatchNormalization", ["x"] + names, ["y1"], name="t")
    n2 = helper.make_node("BatchNormalization", ["y1"] + names, ["t"])
    g = helper.make_graph([n1, n2], "g", [helper.make_tensor_value_info("x", f, [None, c])],
                          [helper.make_tensor_value_info("t", f, [None, c])], inits)
    m = _opset15_model(g)
    layers = bnfast.from_onnx(m)
    assert list(layers) == ["t", "t#1"]
    y = _ort_session(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(layers["t#1"](layers["t"](x)), y, rtol=1e-5, atol=1e-5)


# =======================================================================================
# Keras
# =======================================================================================
# Keras' own variables trigger NumPy 2's __array__(copy=...) DeprecationWarning
keras_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def keras():
    # KERAS_BACKEND picks keras' backend when keras is first imported; set it (unless the
    # caller chose one) only while this module's tests run, not for the rest of the session
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
        yield pytest.importorskip("keras")


@keras_warnings
@pytest.mark.parametrize("axis,shape", [(-1, (8, 5)), (-1, (4, 3, 2, 5)), (1, (4, 5, 3, 2)),
                                        (2, (6, 4, 5))])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False),
                                          (False, False)])
def test_from_keras_matches_keras(keras, axis, shape, center, scale):
    rng = np.random.default_rng(zlib.crc32(repr((axis, shape, center, scale)).encode()))
    c = shape[axis]
    kl = keras.layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=2e-3,
                                         center=center, scale=scale)
    kl.build(shape)
    st = _rand_state(c, rng)
    weights = ([st["weight"]] if scale else []) + ([st["bias"]] if center else []) + [
        st["running_mean"], st["running_var"]]
    kl.set_weights(weights)

    bn = bnfast.from_keras(kl)
    assert bn.axis == axis and bn.eps == pytest.approx(2e-3)
    assert bn.momentum == pytest.approx(0.1) and bn.unbiased_running_var is False
    assert bn.affine == (center or scale) and not bn.training
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    y_k = keras.ops.convert_to_numpy(kl(x, training=False))
    np.testing.assert_allclose(bn(x), y_k, rtol=1e-5, atol=1e-5)

    # one training step: output and moving-stat update as Keras (biased variance)
    y_k = keras.ops.convert_to_numpy(kl(x, training=True))
    y_b = bn.train()(x)
    np.testing.assert_allclose(y_b, y_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, keras.ops.convert_to_numpy(kl.moving_mean),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.running_var,
                               keras.ops.convert_to_numpy(kl.moving_variance),
                               rtol=1e-6, atol=1e-6)


@keras_warnings
def test_from_keras_defaults_and_errors(keras):
    kl = keras.layers.BatchNormalization()
    with pytest.raises(ValueError, match="not built"):
        bnfast.from_keras(kl)
    kl.build((None, 4))
    bn = bnfast.from_keras(kl)
    assert (bn.axis, bn.eps, bn.num_features) == (-1, 1e-3, 4)
    assert bn.momentum == pytest.approx(0.01)
    assert bn.dtype == np.float32
    with pytest.raises(TypeError, match="BatchNormalization"):
        bnfast.from_keras(keras.layers.Dense(3))
    with pytest.raises(TypeError):
        bnfast.from_keras(np.zeros(3))
    rl = keras.layers.BatchNormalization(renorm=True)
    rl.build((None, 4))
    with pytest.raises(NotImplementedError, match="renorm"):
        bnfast.from_keras(rl)


class _DuckKerasBN:
    """Stand-in with the attributes of a (tf.)keras BatchNormalization layer."""

    def __init__(self, axis, c, center=True, scale=True, momentum=0.99, epsilon=1e-3,
                 dtype=np.float32):
        rng = np.random.default_rng(c)
        self.axis, self.center, self.scale = axis, center, scale
        self.momentum, self.epsilon = momentum, epsilon
        self.gamma = rng.uniform(0.5, 2, c).astype(dtype) if scale else None
        self.beta = rng.normal(size=c).astype(dtype) if center else None
        self.moving_mean = rng.normal(size=c).astype(dtype)
        self.moving_variance = rng.uniform(0.5, 2, c).astype(dtype)


def test_from_keras_duck_typed_list_axis_and_identity_fill():
    kl = _DuckKerasBN([3], 4, center=False, scale=True, dtype=np.float64)
    bn = bnfast.from_keras(kl)
    assert bn.axis == 3 and bn.dtype == np.float64
    np.testing.assert_array_equal(bn.weight, kl.gamma)
    np.testing.assert_array_equal(bn.bias, np.zeros(4))
    x = RNG.normal(size=(2, 3, 2, 4))
    ref = _np_bn_eval(x, kl.moving_mean, kl.moving_variance, kl.gamma, 0.0, 1e-3, 3)
    np.testing.assert_allclose(bn(x), ref, rtol=1e-12, atol=1e-12)
    kl = _DuckKerasBN((1,), 4, center=True, scale=False)
    bn = bnfast.from_keras(kl)
    np.testing.assert_array_equal(bn.weight, np.ones(4, np.float32))
    np.testing.assert_array_equal(bn.bias, kl.beta)
    with pytest.raises(ValueError, match="one channel axis"):
        bnfast.from_keras(_DuckKerasBN([1, 2], 4))


# =======================================================================================
# folding
# =======================================================================================
def _make_bn(c, kind, rng, affine=True):
    st = _rand_state(c, rng, np.float64)
    if kind == "frozen":
        return bnfast.FrozenBatchNorm(st["running_mean"], st["running_var"],
                                      st["weight"] if affine else None,
                                      st["bias"] if affine else None, eps=1e-3), st
    bn = bnfast.BatchNorm(c, eps=1e-3, affine=affine, dtype=np.float64)
    bn.load_state_dict({k: v for k, v in st.items() if affine or k.startswith("running")},
                       strict=False)
    return bn.eval(), st


def _torch_bn_args(st, affine, torch, dtype):
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
    c = st["running_mean"].shape[0]
    w = t(st["weight"]) if affine else t(np.ones(c))
    b = t(st["bias"]) if affine else t(np.zeros(c))
    return t(st["running_mean"]), t(st["running_var"]), 1e-3, w, b


@pytest.mark.parametrize("kind", ["layer", "frozen"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_linear_matches_torch(kind, dtype, with_bias, affine):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    rng = np.random.default_rng(11)
    bn, st = _make_bn(6, kind, rng, affine)
    w = rng.normal(size=(6, 4)).astype(dtype)
    b = rng.normal(size=6).astype(dtype) if with_bias else None
    fw, fb = bnfast.fold_linear(w, b, bn)
    assert fw.dtype == np.dtype(dtype) and fb.dtype == np.dtype(dtype)
    assert fw.shape == (6, 4) and fb.shape == (6,)
    tdt = getattr(torch, dtype)
    tw, tb = fuse_linear_bn_weights(torch.from_numpy(w),
                                    None if b is None else torch.from_numpy(b),
                                    *_torch_bn_args(st, affine, torch, tdt))
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=tol, atol=tol)
    # and the folded layer computes bn(linear(x)) (float64 NumPy reference)
    x = rng.normal(size=(5, 4))
    ref = _np_bn_eval(x @ w.astype(np.float64).T + (0 if b is None else b), st["running_mean"],
                      st["running_var"], st["weight"] if affine else 1.0,
                      st["bias"] if affine else 0.0, 1e-3, 1)
    np.testing.assert_allclose(x @ fw.astype(np.float64).T + fb, ref,
                               rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("wshape,groups,transpose", [
    ((6, 4, 3), 1, False),            # Conv1d
    ((6, 2, 3, 3), 2, False),         # Conv2d, groups=2
    ((6, 1, 3, 3), 6, False),         # depthwise
    ((6, 4, 1, 2, 2), 1, False),      # Conv3d
    ((4, 6, 3, 3), 1, True),          # ConvTranspose2d (in, out, k, k)
])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fold_conv_matches_torch(wshape, groups, transpose, with_bias, dtype):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    rng = np.random.default_rng(12)
    bn, st = _make_bn(6, "layer", rng)
    w = rng.normal(size=wshape).astype(dtype)
    b = rng.normal(size=6).astype(dtype) if with_bias else None
    fw, fb = bnfast.fold_conv(w, b, bn, transpose=transpose)
    assert fw.dtype == np.dtype(dtype) and fw.shape == w.shape and fb.shape == (6,)
    tdt = getattr(torch, dtype)
    tw, tb = fuse_conv_bn_weights(torch.from_numpy(w),
                                  None if b is None else torch.from_numpy(b),
                                  *_torch_bn_args(st, True, torch, tdt), transpose=transpose)
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=tol, atol=tol)
    # the folded convolution equals conv followed by the batch norm (torch, float64)
    nd = len(wshape) - 2
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[nd]
    if transpose:
        conv = {2: torch.nn.functional.conv_transpose2d}[nd]
    cin = wshape[0] if transpose else wshape[1] * groups
    x = torch.from_numpy(rng.normal(size=(2, cin) + (5,) * nd))
    kw = {} if transpose else {"groups": groups}
    z = conv(x, torch.from_numpy(w.astype(np.float64)),
             None if b is None else torch.from_numpy(b.astype(np.float64)), **kw)
    ref = _np_bn_eval(z.numpy(), st["running_mean"], st["running_var"], st["weight"],
                      st["bias"], 1e-3, 1)
    got = conv(x, torch.from_numpy(fw.astype(np.float64)),
               torch.from_numpy(fb.astype(np.float64)), **kw).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 if dtype == "float32" else 1e-10)


def test_fold_without_torch_and_errors():
    rng = np.random.default_rng(13)
    bn, st = _make_bn(3, "frozen", rng)
    w = rng.normal(size=(3, 2))
    fw, fb = bnfast.fold_linear(w.tolist(), None, bn)  # lists accepted, bias None
    s = st["weight"] / np.sqrt(st["running_var"] + 1e-3)
    np.testing.assert_allclose(fw, w * s[:, None], rtol=1e-15)
    np.testing.assert_allclose(fb, -st["running_mean"] * s + st["bias"], rtol=1e-14)
    fw, _ = bnfast.fold_linear(np.ones((3, 2), np.int64), None, bn)
    assert fw.dtype == np.float64

    with pytest.raises(ValueError, match="output channels"):
        bnfast.fold_linear(np.ones((4, 2)), None, bn)
    with pytest.raises(ValueError, match="bias"):
        bnfast.fold_linear(np.ones((3, 2)), np.ones(4), bn)
    with pytest.raises(ValueError, match="output channels"):
        bnfast.fold_conv(np.ones((3, 4, 2)), None, bn, transpose=True)
    with pytest.raises(ValueError, match="eval"):
        bnfast.fold_linear(w, None, bnfast.BatchNorm(3))  # training mode
    with pytest.raises(ValueError, match="running statistics"):
        bnfast.fold_linear(w, None, bnfast.BatchNorm(3, track_running_stats=False).eval())
    with pytest.raises(TypeError, match="from_torch"):
        bnfast.fold_linear(w, None, object())
    with pytest.raises(TypeError):
        bnfast.fold_linear(np.array([["a", "b"]] * 3), None, bn)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_fold_conv_one_float64_temporary(dtype):
    """Folding scales one float64 copy of the weight in place, with the bits of the
    product of the widened weight, and never holds two (a 512x512x3x3 weight: a peak of
    1.0-1.5x its float64 size, with the float32 result; it had been 2.0x)."""
    import tracemalloc

    rng = np.random.default_rng(14)
    bn, st = _make_bn(64, "frozen", rng)
    w = (rng.normal(size=(64, 128, 3, 3)) * 10).astype(dtype)
    fold = bnfast.fold_conv        # a lazy import is not the fold's memory
    fold(w[:, :1], None, bn)
    tracemalloc.start()
    try:
        fw, _ = fold(w, None, bn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    s = st["weight"] / np.sqrt(st["running_var"] + 1e-3)
    ref = (w.astype(np.float64) * s[:, None, None, None]).astype(fw.dtype)
    assert fw.dtype == (np.float64 if dtype == np.int32 else dtype)
    assert fw.tobytes() == ref.tobytes()
    assert peak <= 1.6 * w.size * 8 + 16384, peak


def test_from_onnx_constants_as_value_floats():
    """Parameters given by Constant nodes with value_floats (a list of C floats each)
    give the layer the values initializers would (600 channels: converted without a
    Python list of the values, ~125 ns a channel)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    c, f = 600, onnx.TensorProto.FLOAT
    rng = np.random.default_rng(12)
    st = {k: v.astype(np.float32) for k, v in _rand_state(c, rng).items()}
    st["running_mean"] += np.float32(50.0)
    names = ["weight", "bias", "running_mean", "running_var"]
    consts = [helper.make_node("Constant", [], [k], value_floats=st[k].tolist()) for k in names]
    n = helper.make_node("BatchNormalization", ["x"] + names, ["y"], name="bn")
    g = helper.make_graph(consts + [n], "g", [helper.make_tensor_value_info("x", f, [None, c])],
                          [helper.make_tensor_value_info("y", f, [None, c])])
    layer = bnfast.from_onnx(_opset15_model(g))["bn"]
    x = rng.normal(size=(8, c)).astype(np.float32)
    ref = bnfast.FrozenBatchNorm(st["running_mean"], st["running_var"], st["weight"],
                                 st["bias"])
    assert layer(x).tobytes() == ref(x).tobytes()
    y = _ort_session(_opset15_model(g)).run(None, {"x": x})[0]
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# bfloat16 (and float8) parameters: no NumPy dtype, widened to float32 exactly
# ---------------------------------------------------------------------------------------
def _bf16_calls(torch, as_param):
    """(name, call) pairs taking per-channel parameters or weights through as_param."""
    rng = np.random.default_rng(30)
    x = (rng.normal(size=(6, 3)) + 1e3).astype(np.float32)
    mean, var = [1e3, 1e3 + 1, 1e3 - 1], [0.5, 2.0, 3.0]
    w, b = [1.5, -0.25, 2.0], [0.125, 1.0, -3.0]
    fz = bnfast.FrozenBatchNorm(np.array(mean), np.array(var))
    lin = rng.normal(size=(3, 4))
    conv = rng.normal(size=(3, 2, 3, 3))
    rs = bnfast.RunningStats(3, axis=-1).update(x)
    return [
        ("FrozenBatchNorm", lambda: bnfast.FrozenBatchNorm(
            as_param(mean), as_param(var), as_param(w), as_param(b))(x)),
        ("batch_norm", lambda: bnfast.batch_norm(
            x, as_param(mean), as_param(var), as_param(w), as_param(b), training=False)),
        ("batch_norm_train", lambda: bnfast.batch_norm_train(x, as_param(w), as_param(b))[0]),
        ("fold_linear", lambda: bnfast.fold_linear(as_param(lin), as_param(b), fz)),
        ("fold_conv", lambda: bnfast.fold_conv(as_param(conv), None, fz)),
        ("RunningStats.freeze", lambda: rs.freeze(weight=as_param(w), bias=as_param(b))(x)),
    ]


@pytest.mark.parametrize("tdtype", ["bfloat16", "float8_e4m3fn"])
def test_torch_bfloat16_parameters_accepted(tdtype):
    """A bfloat16 model's tensors work wherever float16 ones do, as their values widened
    to float32 (Tensor.numpy() refuses them: 'Got unsupported ScalarType BFloat16')."""
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, tdtype, None)
    if tdt is None:
        pytest.skip(f"this torch has no {tdtype}")

    def low(v):
        return torch.tensor(np.asarray(v, np.float64)).to(tdt)

    def widened(v):          # the same values, as NumPy holds them
        return low(v).float().numpy()

    for (name, got), (_, want) in zip(_bf16_calls(torch, low), _bf16_calls(torch, widened)):
        g, w = got(), want()
        for a, b in zip(g if isinstance(g, tuple) else (g,), w if isinstance(w, tuple) else (w,)):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_from_onnx_bfloat16_parameters():
    """BatchNormalization's T, T1 and T2 include bfloat16 (opsets 14, 15)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    vals = {"s": [2.0, 1.5, -0.5], "b": [0.5, 0.0, 1.0], "m": [1.0, 128.0, -3.0],
            "v": [4.0, 0.25, 1.0]}
    inits = [helper.make_tensor(k, onnx.TensorProto.BFLOAT16, [3], v) for k, v in vals.items()]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                            name="bn0", epsilon=1e-3)
    vi = helper.make_tensor_value_info
    g = helper.make_graph([node], "g", [vi("x", onnx.TensorProto.BFLOAT16, [None, 3])],
                          [vi("y", onnx.TensorProto.BFLOAT16, [None, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(m, full_check=True)
    fz = bnfast.from_onnx(m)["bn0"]
    np.testing.assert_array_equal(fz.weight, vals["s"])
    np.testing.assert_array_equal(fz.bias, vals["b"])
    np.testing.assert_array_equal(fz.mean, vals["m"])
    np.testing.assert_array_equal(fz.var, vals["v"])


def test_load_refuses_a_npy_file(tmp_path):
    np.save(tmp_path / "p.npy", np.ones(3))
    with pytest.raises(ValueError, match="not a bnfast layer file.*one array"):
        bnfast.load(tmp_path / "p.npy")


def test_from_torch_affine_without_weight():
    torch = pytest.importorskip("torch")
    tm = torch.nn.BatchNorm1d(3)
    tm.weight = None
    with pytest.raises(ValueError, match="weight or bias is None"):
        bnfast.from_torch(tm)


def test_fold_refuses_statistics_eval_refuses_and_non_bool_transpose():
    # folding bakes the statistics in for good: a negative or NaN running_var, which
    # eval and freeze() refuse, gave NaN weights; transpose="False" read as true
    bn = bnfast.BatchNorm(2, axis=-1, dtype=np.float64).eval()
    for bad in (-0.5, np.nan):
        bn.running_var[0] = bad
        with pytest.raises(ValueError, match="running_var"):
            bnfast.fold_linear(np.eye(2), None, bn)
        with pytest.raises(ValueError, match="running_var"):
            bnfast.fold_conv(np.ones((2, 2, 3)), None, bn)
    frozen = bnfast.FrozenBatchNorm(np.zeros(4), np.array([1.0, 4.0, 9.0, 16.0]))
    w = np.arange(48.0).reshape(4, 4, 3)
    with pytest.raises(TypeError, match="transpose"):
        bnfast.fold_conv(w, None, frozen, transpose="False")
    assert np.array_equal(bnfast.fold_conv(w, None, frozen, transpose=np.False_)[0],
                          bnfast.fold_conv(w, None, frozen)[0])
    with pytest.raises(ValueError, match="2 dimensions"):   # a Linear weight is (out, in)
        bnfast.fold_linear(np.ones((4, 2, 5)), None, frozen)


def test_load_refuses_truncated_corrupt_and_empty_files_with_value_error(tmp_path):
    # an interrupted save: the zip reader's BadZipFile, EOFError escaped `except
    # ValueError`
    data = open(bnfast.BatchNorm(3).save(tmp_path / "good.npz"), "rb").read()
    central = data.find(b"PK\x01\x02")             # the first central directory entry
    method, flags = bytearray(data), bytearray(data)
    method[central + 10] = 99                         # an unknown compression method
    flags[central + 8] |= 1                           # "encrypted"
    cases = {"half": data[:len(data) // 2], "empty": b"",
             "crc": data[:120] + bytes([data[120] ^ 0xFF]) + data[121:],
             "method": bytes(method), "encrypted": bytes(flags)}
    for name, content in cases.items():
        p = tmp_path / f"{name}.npz"
        p.write_bytes(content)
        with pytest.raises(ValueError, match="not a bnfast layer file"):
            bnfast.load(p)


def test_load_refuses_a_non_float_dtype_and_checks_shapes_before_allocating(tmp_path):
    d = _saved_layer_arrays(tmp_path)
    d["config.dtype"] = np.array("int64")
    _load_refused(tmp_path, d, "config is refused.*float")
    d["config.dtype"] = np.array("float32")
    d["config.num_features"] = np.array(2**60)     # would allocate before the check
    _load_refused(tmp_path, d, "num_features is 1152921504606846976")
    d["config.num_features"] = np.array(2)
    del d["state.weight"]
    _load_refused(tmp_path, d, "state.weight")


def _onnx_bn_in_function(c, eps=1e-5):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    vals = dict(s=rng.uniform(.5, 2, c), b=rng.uniform(-1, 1, c), m=rng.uniform(-1, 1, c),
                v=rng.uniform(.5, 2, c))
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in vals.items()]
    fn = helper.make_function(
        "local", "MyBN", ["X", "S", "B", "M", "V"], ["Y"],
        [helper.make_node("BatchNormalization", ["X", "S", "B", "M", "V"], ["Y"],
                          name="inner_bn", epsilon=eps)],
        opset_imports=[helper.make_opsetid("", 15)])
    call = helper.make_node("MyBN", ["x", "s", "b", "m", "v"], ["y"], domain="local",
                            name="call")
    g = helper.make_graph([call], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [None, c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15),
                                               helper.make_opsetid("local", 1)],
                             functions=[fn])


def test_from_onnx_reads_batch_norms_inside_model_local_functions():
    # torch.onnx.export(..., export_modules_as_functions=...) puts them there; the
    # walk of the graph alone returned {} without a word
    ort = pytest.importorskip("onnxruntime")
    model = _onnx_bn_in_function(3)
    layers = bnfast.from_onnx(model)
    assert len(layers) == 1
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(next(iter(layers.values()))(x), sess.run(None, {"x": x})[0],
                               rtol=1e-6, atol=1e-6)


def test_from_onnx_names_the_node_whose_parameters_are_refused():
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="BatchNormalization node .*eps"):
        bnfast.from_onnx(_onnx_bn_in_function(3, eps=0.0))


def test_from_torch_meta_module_is_a_value_error():
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        m = torch.nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="meta"):
        bnfast.from_torch(m)


def test_from_onnx_sparse_initializers_and_constants():
    # a sparse parameter was "not defined in the graph", a sparse Constant "computed at
    # run time by node 'Constant'"
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    c = 4
    scale, var = np.array([0, 2, 0, 3], np.float32), np.array([1, 4, 9, 16], np.float32)
    sp_scale = helper.make_sparse_tensor(
        numpy_helper.from_array(scale[[1, 3]], "s"), numpy_helper.from_array(
            np.array([1, 3], np.int64), "s_idx"), [c])
    sp_var = helper.make_sparse_tensor(numpy_helper.from_array(var, "vv"),
                                       numpy_helper.from_array(
                                           np.array([[0], [1], [2], [3]], np.int64), "v_idx"),
                                       [c])
    const = helper.make_node("Constant", [], ["v"], sparse_value=sp_var)
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    inits = [numpy_helper.from_array(np.full(c, 0.5, np.float32), "b"),
             numpy_helper.from_array(np.zeros(c, np.float32), "m")]
    g = helper.make_graph([const, bn], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c])],
                          inits, sparse_initializer=[sp_scale])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    frozen = bnfast.from_onnx(model)["bn"]
    np.testing.assert_array_equal(frozen.weight, scale)
    np.testing.assert_array_equal(frozen.var, var)
