"""Long-double reference of batch normalization on a whole (concatenated) batch, for the
SyncBatchNorm tests: independent of bnfast, exact well below float64 rounding (the
data are centred exactly, so even offsets of 1e6 with spreads of 1e-3 lose nothing).

``Exact`` follows torch.nn.BatchNorm*d semantics (running updates with the unbiased
variance unless ``unbiased_running_var=False``; momentum None = cumulative average) and
keeps its running statistics in long double.
"""
import numpy as np

LD = np.longdouble


def _bs(ndim, ax):
    s = [1] * ndim
    s[ax] = -1
    return tuple(s)


class Exact:
    def __init__(self, C, eps=1e-5, momentum=0.1, *, axis=1, unbiased_running_var=True,
                 weight=None, bias=None, track_running_stats=True):
        self.C, self.eps, self.momentum, self.axis = C, LD(eps), momentum, axis
        self.unbiased = unbiased_running_var
        self.track = track_running_stats
        self.w = np.ones(C, LD) if weight is None else np.asarray(weight).astype(LD)
        self.b = np.zeros(C, LD) if bias is None else np.asarray(bias).astype(LD)
        self.running_mean = np.zeros(C, LD)
        self.running_var = np.ones(C, LD)
        self.num_batches_tracked = 0

    def forward(self, x):
        """y for the whole batch x (long double); updates the running statistics."""
        x = np.asarray(x)
        ax = self.axis % x.ndim
        red = tuple(i for i in range(x.ndim) if i != ax)
        bs = _bs(x.ndim, ax)
        n = x.size // x.shape[ax]
        # centre on a double first: x - hi is exact (both doubles, close), so the
        # centred data keep long-double precision relative to the spread, not to the
        # offset (a plain long-double mean loses 2**-64 * offset)
        hi = x.astype(np.float64).mean(axis=red)
        d = x.astype(np.float64).astype(LD) - hi.astype(LD).reshape(bs)
        lo = d.mean(axis=red)
        xc = d - lo.reshape(bs)
        mean = hi.astype(LD) + lo
        var = (xc * xc).mean(axis=red)
        invstd = 1 / np.sqrt(var + self.eps)
        if self.track:
            self.num_batches_tracked += 1
            f = (LD(1) / self.num_batches_tracked if self.momentum is None
                 else LD(self.momentum))
            v = var * n / (n - 1) if self.unbiased else var
            self.running_mean = (1 - f) * self.running_mean + f * mean
            self.running_var = (1 - f) * self.running_var + f * v
        self._saved = (xc * invstd.reshape(bs), invstd, n, ax, red, bs)
        return xc * (invstd * self.w).reshape(bs) + self.b.reshape(bs)

    def backward(self, dy):
        """(dx, grad_weight, grad_bias) for the whole batch (long double)."""
        xhat, invstd, n, ax, red, bs = self._saved
        dy = np.asarray(dy).astype(LD)
        gb = dy.sum(axis=red)
        gw = (dy * xhat).sum(axis=red)
        dx = (self.w * invstd).reshape(bs) * (dy - (gb / n).reshape(bs)
                                               - xhat * (gw / n).reshape(bs))
        return dx, gw, gb
