"""Issue 3: outputs written with streaming (non-temporal) stores.

Large outputs are computed into an L1 buffer and streamed out with the widest stores the
CPU has, narrow contiguous rows several at a time. The arithmetic is the same either way,
so forcing streaming on for small arrays must give the same bits as plain stores, for
every kernel, every layout of the input and of ``out=`` (unaligned heads, gaps between
rows, reversed strides), narrow and wide rows, short and long runs."""
import numpy as np
import pytest

import bnfast
from arrays import OUT_LAYOUTS, make_values, out_like, params, with_layout
from bnfast._core import _set_stream_bytes
from reference import assert_forward_close
import reference as ref

# (shape, axis): rows form narrow (width * 4 < 512 bytes), contiguous or not; rows wider
# than a staging chunk; runs shorter than the streaming minimum, and long runs whose
# length is not a multiple of any vector width.
SHAPES = [
    ((301, 7), -1),          # narrow rows: many per staged chunk
    ((97, 200), -1),         # 800-byte rows
    ((13, 1500), -1),        # rows wider than a chunk, several channel blocks
    ((5, 6, 11, 3), 1),      # runs of 33 elements: too short to stream
    ((3, 4, 1037), 1),       # runs of 1037 elements: chunked, odd tail
    ((2, 3, 40, 41), 1),
    ((4, 9, 10, 17), -1),    # channels last
]


@pytest.fixture
def stream_always():
    old = _set_stream_bytes(0)
    yield
    _set_stream_bytes(old)


def _ops(x, axis, out_layout):
    C = x.shape[axis]
    w, b, rm, rv = params(C, np.float64, 3)
    dy = with_layout(make_values(x.shape, x.dtype, 5, axis=axis), "c", axis=axis)
    res = []
    o = out_like(x, out_layout, seed=1)
    bnfast.batch_norm_train(x, w, b, axis=axis, out=o)
    res.append(("train out=", o.copy()))
    res.append(("train", bnfast.batch_norm_train(x, w, b, axis=axis)[0]))
    o = out_like(x, out_layout, seed=2)
    bnfast.batch_norm(x, rm, rv, w, b, axis=axis, out=o)
    res.append(("eval out=", o.copy()))
    y, m, s = bnfast.batch_norm_train(x, w, b, axis=axis)
    for training in (True, False):
        o = out_like(x, out_layout, seed=3)
        bnfast.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis, out=o)
        res.append((f"dx[{training}] out=", o.copy()))
    return res


@pytest.mark.usefixtures("threads_on_small_arrays")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_streamed_output_equals_plain_stores(shape, axis, dtype, out_layout, threads):
    x = make_values(shape, dtype, 11, axis=axis, offset=1e4)
    bnfast.set_num_threads(threads)
    try:
        old = _set_stream_bytes(1 << 62)
        try:
            plain = _ops(x, axis, out_layout)
            _set_stream_bytes(0)
            streamed = _ops(x, axis, out_layout)
        finally:
            _set_stream_bytes(old)
    finally:
        bnfast.set_num_threads(None)
    for (name, a), (_, g) in zip(plain, streamed):
        assert not np.isnan(g).any(), f"{name}: elements left unwritten"
        assert a.tobytes() == g.tobytes(), f"{name}: streamed output differs"
    # and both are right (the comparison above is not of two wrong answers)
    y_ref = ref.batch_norm_train(x, *params(x.shape[axis], np.float64, 3)[:2], axis=axis)[0]
    assert_forward_close(streamed[0][1], y_ref)


@pytest.mark.parametrize("layout", ["c", "channels_last", "step", "negative", "unaligned"])
def test_streamed_input_layouts(stream_always, layout):
    shape, axis = (6, 5, 23, 29), 1
    x = with_layout(make_values(shape, np.float32, 4, axis=axis, offset=1e5), layout,
                    axis=axis)
    w, b = params(5, np.float64, 0)[:2]
    y = bnfast.batch_norm_train(x, w, b, axis=axis)[0]
    assert_forward_close(y, ref.batch_norm_train(x, w, b, axis=axis)[0])
