"""The one generator of awkward test arrays, shared by every test (bottleneck style).

``make_values`` draws the data (optionally price-like: a large per-channel offset with a
small spread); ``with_layout`` re-lays the same values out in memory in one of
``LAYOUTS``; ``awkward_arrays`` yields every applicable layout of one draw. The
hypothesis strategies at the bottom draw cases (shape, axis, dtype, layout, offset,
spread, seed) from the same pieces.

Always compute the reference from the array the test hands to bnfast: a few layouts
(``broadcast``) change the values, and all of them keep the shape and dtype.
"""
import itertools
from dataclasses import dataclass

import numpy as np

# Memory layouts of an array with a given shape. Each keeps the shape and the dtype.
LAYOUTS = (
    "c",               # C-contiguous
    "f",               # Fortran order
    "channels_last",   # the channel axis innermost in memory (NHWC memory, NCHW shape)
    "channels_first",  # the channel axis outermost in memory
    "permuted",        # a random permutation of the memory order of the axes
    "step",            # every axis sliced with step 2 out of a NaN-filled parent
    "channel_step",    # the channel axis alone sliced so: channels apart, runs contiguous
    "crop",            # every non-channel axis cropped by one at each end (C-ordered parent)
    "crop_channels_last",  # the same of a channels-last parent (rows in segments)
    "negative",        # every axis reversed (all strides negative)
    "negative_some",   # the batch axis and the channel axis reversed
    "swapped",         # non-native byte order
    "readonly",        # C order, not writeable
    "unaligned",       # data pointer not aligned to the itemsize
    "size1_strides",   # odd strides on the size-1 axes (shape must have one)
    "broadcast",       # a non-channel axis of stride 0 (read-only; repeats values)
)

# Layouts usable as ``out=`` (writable, native byte order).
OUT_LAYOUTS = ("c", "f", "channels_last", "channels_first", "permuted", "step",
               "channel_step", "crop", "crop_channels_last", "negative", "negative_some",
               "unaligned")

OFFSETS = (0.0, 1e3, 1e5, 1e6, 3e6)


def _copy_c(a):
    """A fresh C-ordered copy (never a view of ``a``)."""
    return np.array(a, order="C", copy=True)


def normalize_axis(axis, ndim):
    return axis + ndim if axis < 0 else axis


def make_values(shape, dtype=np.float64, seed=0, *, axis=1, offset=0.0, spread=1.0):
    """Random data of ``dtype`` with per-channel location and scale.

    offset == 0: channel means in [-2, 2], standard deviations spread * [0.5, 2].
    offset > 0 (price-like): channel means offset * [0.5, 1.5], same spreads."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    ax = normalize_axis(axis, len(shape))
    C = shape[ax]
    bs = [1] * len(shape)
    bs[ax] = C
    if offset:
        loc = offset * rng.uniform(0.5, 1.5, C)
    else:
        loc = rng.uniform(-2.0, 2.0, C)
    sd = spread * rng.uniform(0.5, 2.0, C)
    data = loc.reshape(bs) + sd.reshape(bs) * rng.standard_normal(shape)
    return data.astype(dtype)


def applicable(shape, axis, layout):
    """Whether ``layout`` means something for this shape (else it is skipped)."""
    ax = normalize_axis(axis, len(shape))
    if layout == "size1_strides":
        return any(s == 1 for s in shape)
    if layout == "broadcast":
        return any(s > 1 for i, s in enumerate(shape) if i != ax)
    return True


def with_layout(a, layout, *, axis=1, seed=0):
    """The values of ``a`` (shape, dtype kept) laid out in memory as ``layout``."""
    a = np.asarray(a)
    nd = a.ndim
    ax = normalize_axis(axis, nd)
    rng = np.random.default_rng(seed + 7919)
    if layout == "c":
        return np.array(a, order="C", copy=True)
    if layout == "f":
        return np.array(a, order="F", copy=True)
    if layout == "channels_last":
        m = _copy_c(np.moveaxis(a, ax, -1))
        return np.moveaxis(m, -1, ax)
    if layout == "channels_first":
        m = _copy_c(np.moveaxis(a, ax, 0))
        return np.moveaxis(m, 0, ax)
    if layout == "permuted":
        perm = rng.permutation(nd)
        m = _copy_c(a.transpose(perm))
        return m.transpose(np.argsort(perm))
    if layout == "step":
        parent = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, a.dtype)
        v = parent[(slice(1, None, 2),) * nd]
        v[...] = a
        return v
    if layout == "channel_step":
        pshape = list(a.shape)
        pshape[ax] = 2 * a.shape[ax] + 1
        parent = np.full(pshape, np.nan, a.dtype)
        v = parent[(slice(None),) * ax + (slice(1, None, 2),)]
        v[...] = a
        return v
    if layout in ("crop", "crop_channels_last"):
        last = layout == "crop_channels_last"
        m = np.moveaxis(a, ax, -1) if last else a
        pshape = tuple(s if (i == nd - 1 if last else i == ax) else s + 2
                       for i, s in enumerate(m.shape))
        parent = np.full(pshape, np.nan, a.dtype)
        v = parent[tuple(slice(None) if (i == nd - 1 if last else i == ax) else
                         slice(1, -1) for i in range(nd))]
        v[...] = m
        return np.moveaxis(v, -1, ax) if last else v
    if layout == "negative":
        m = _copy_c(np.flip(a))
        return np.flip(m)
    if layout == "negative_some":
        axes = tuple(sorted({0, ax}))
        m = _copy_c(np.flip(a, axes))
        return np.flip(m, axes)
    if layout == "swapped":
        return a.astype(a.dtype.newbyteorder("S"))
    if layout == "readonly":
        m = np.array(a, order="C", copy=True)
        m.flags.writeable = False
        return m
    if layout == "unaligned":
        buf = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
        m = buf[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
        m[...] = a
        assert a.itemsize == 1 or not m.flags.aligned or a.size == 0
        return m
    if layout == "size1_strides":
        m = np.array(a, order="C", copy=True)
        strides = tuple(
            (int(rng.integers(-5, 50)) * a.itemsize + (a.itemsize if i % 2 else 0))
            if s == 1 else st for i, (s, st) in enumerate(zip(m.shape, m.strides)))
        return np.lib.stride_tricks.as_strided(m, m.shape, strides, writeable=False)
    if layout == "broadcast":
        cands = [i for i, s in enumerate(a.shape) if i != ax and s > 1]
        if not cands:
            raise ValueError("broadcast needs a non-channel axis of size > 1")
        b = int(rng.choice(cands))
        idx = [slice(None)] * nd
        idx[b] = slice(0, 1)
        return np.broadcast_to(np.array(a[tuple(idx)]), a.shape)
    raise ValueError(f"unknown layout {layout!r}")


def awkward_arrays(shape, axis=1, dtype=np.float64, seed=0, *, offsets=(0.0,),
                   spread=1.0, layouts=LAYOUTS):
    """Yield (label, array) for every applicable layout x offset of one random draw."""
    for offset in offsets:
        base = make_values(shape, dtype, seed, axis=axis, offset=offset, spread=spread)
        for layout in layouts:
            if applicable(shape, axis, layout):
                yield (f"{layout}/off={offset:g}",
                       with_layout(base, layout, axis=axis, seed=seed))


def params(C, dtype=np.float64, seed=0):
    """Random (weight, bias, running_mean, running_var) of length C."""
    rng = np.random.default_rng(seed + 104729)
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    rm = rng.uniform(-1.0, 1.0, C)
    rv = rng.uniform(0.5, 2.0, C)
    return tuple(v.astype(dtype) for v in (w, b, rm, rv))


def out_like(x, layout="c", seed=0, dtype=None):
    """A writable, NaN-filled array with x's shape in ``layout`` (for ``out=``)."""
    dtype = x.dtype.newbyteorder("=") if dtype is None else np.dtype(dtype)
    filler = np.full(x.shape, np.nan, dtype)
    o = with_layout(filler, layout, axis=0, seed=seed)
    o[...] = np.nan
    return o


# A fixed grid of shapes and axes for the parametrized (non-hypothesis) tests:
# (N, C), NCL, NCHW, NCDHW, channels-last, size-1 axes, a single channel.
SHAPES_AXES = [
    ((7, 3), 1), ((7, 3), -1), ((5, 1), 1), ((2, 9), 0),
    ((4, 3, 5), 1), ((4, 3, 5), -1), ((3, 4, 1), 1), ((1, 3, 6), 1),
    ((2, 3, 4, 5), 1), ((2, 4, 3, 5), -1), ((2, 3, 4, 5), 2), ((2, 3, 1, 5), -3),
    ((2, 3, 2, 3, 2), 1), ((2, 2, 3, 2, 3), -1), ((1, 1, 3, 1, 4), 2),
]


# ----------------------------------------------------------------------------------
# hypothesis strategies

@dataclass(frozen=True)
class Case:
    shape: tuple
    axis: int
    dtype: type
    layout: str
    offset: float
    spread: float
    seed: int

    @property
    def ax(self):
        return normalize_axis(self.axis, len(self.shape))

    @property
    def C(self):
        return self.shape[self.ax]

    @property
    def n(self):
        """Values per channel."""
        return int(np.prod(self.shape)) // self.C

    def array(self):
        base = make_values(self.shape, self.dtype, self.seed, axis=self.axis,
                           offset=self.offset, spread=self.spread)
        return with_layout(base, self.layout, axis=self.axis, seed=self.seed)

    def params(self, dtype=None):
        return params(self.C, self.dtype if dtype is None else dtype, self.seed)


def cases(*, min_ndim=2, max_ndim=5, max_side=6, dtypes=(np.float32, np.float64),
          layouts=LAYOUTS, offsets=(0.0, 0.0, 1e3, 1e5, 3e6), spreads=(1.0, 1e-2),
          training=False):
    """A hypothesis strategy of ``Case``s. training=True: at least 2 values per channel."""
    from hypothesis import assume, strategies as st

    @st.composite
    def _case(draw):
        nd = draw(st.integers(min_ndim, max_ndim))
        shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=nd, max_size=nd)))
        axis = draw(st.integers(-nd, nd - 1))
        layout = draw(st.sampled_from([k for k in layouts if applicable(shape, axis, k)]
                                      or ["c"]))
        c = Case(shape, axis, draw(st.sampled_from(dtypes)), layout,
                 draw(st.sampled_from(offsets)), draw(st.sampled_from(spreads)),
                 draw(st.integers(0, 2**32 - 1)))
        if training:
            assume(c.n >= 2)
        return c

    return _case()


def all_shapes(max_ndim=3, sides=(1, 2, 3)):
    """Every shape of ndim 2..max_ndim with the given sides (small, exhaustive)."""
    for nd in range(2, max_ndim + 1):
        yield from itertools.product(sides, repeat=nd)
