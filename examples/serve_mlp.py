"""Serve a small MLP whose batch norms are folded into the Linear layers.

The model is ``Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm -> ReLU -> Linear``
on NumPy matmuls, trained for a few SGD steps on synthetic market data with bnfast
layers (``bnfast.BatchNorm1d`` forward/backward), or, with ``--torch``, trained in
PyTorch and brought in with ``bnfast.from_torch``. For serving, each batch norm is
folded into the preceding Linear with ``bnfast.fold_linear``: one matmul + bias per
layer, no normalization pass. The folded model is checked against the unfolded
inference model (and against PyTorch's own eval output with ``--torch``).

Features are log returns, not raw prices: folding puts ``-mean * scale`` into the
bias, and on price-level Linear outputs (offsets of 1e4 and more) a float32 matmul
then loses the digits that bnfast's own batch norm keeps. Serve raw-price models
unfolded (``FrozenBatchNorm``), or the folded ones in float64.

Run:  python examples/serve_mlp.py [--torch] [--steps N]
"""
import argparse
import time

import numpy as np

import bnfast

N_LAGS = 8
HIDDEN = (32, 16)


def make_data(rng, n):
    """(features, target): the last N_LAGS log returns (in %) of a random-walk price
    around 1e4, and a nonlinear function of them plus noise."""
    steps = rng.normal(scale=1e-3, size=(n, N_LAGS + 1))
    prices = 1e4 * np.exp(np.cumsum(steps, axis=1))
    x = (np.diff(np.log(prices), axis=1) * 100).astype(np.float32)
    y = (np.tanh(x[:, :3].sum(1)) - 0.5 * np.abs(x[:, 3:]).mean(1)
         + rng.normal(scale=0.01, size=n)).astype(np.float32)
    return x, y[:, None]


def init_linear(rng, n_in, n_out):
    w = (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    return w, np.zeros(n_out, np.float32)


def relu(z):
    return np.maximum(z, 0)


class MLP:
    """Linear/BatchNorm/ReLU stack with hand-written backward on NumPy arrays."""

    def __init__(self, rng):
        sizes = (N_LAGS,) + HIDDEN + (1,)
        self.linears = [init_linear(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.norms = [bnfast.BatchNorm1d(h) for h in HIDDEN]

    def forward(self, x):
        self._acts = []
        h = x
        for (w, b), bn in zip(self.linears[:-1], self.norms):
            a = bn(h @ w.T + b)
            self._acts.append((h, a))
            h = relu(a)
        self._last_in = h
        w, b = self.linears[-1]
        return h @ w.T + b

    def sgd_step(self, x, y, lr):
        out = self.forward(x)
        loss = float(np.mean((out - y) ** 2))
        dout = (2.0 / len(x)) * (out - y)
        grads = []
        w, _ = self.linears[-1]
        grads.append((dout.T @ self._last_in, dout.sum(0)))
        dh = dout @ w
        for i in reversed(range(len(self.norms))):
            h_in, a = self._acts[i]
            da = dh * (a > 0)
            dz = self.norms[i].backward(da)
            w, _ = self.linears[i]
            grads.append((dz.T @ h_in, dz.sum(0)))
            dh = dz @ w
            bn = self.norms[i]
            bn.weight -= lr * bn.grad_weight
            bn.bias -= lr * bn.grad_bias
        for (w, b), (dw, db) in zip(self.linears, reversed(grads)):
            w -= lr * dw.astype(np.float32)
            b -= lr * db.astype(np.float32)
        return loss

    def eval(self):
        for bn in self.norms:
            bn.eval()
        return self


def train_bnfast(rng, steps, batch=128, lr=0.05):
    model = MLP(rng)
    losses = []
    for _ in range(steps):
        x, y = make_data(rng, batch)
        losses.append(model.sgd_step(x, y, lr))
    return model.eval(), losses, None


def train_torch(rng, steps, batch=128, lr=0.05):
    """The same architecture trained in PyTorch, then brought in with from_torch."""
    import torch

    torch.manual_seed(int(rng.integers(2**31)))
    sizes = (N_LAGS,) + HIDDEN
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 1))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, y = make_data(rng, batch)
        loss = torch.nn.functional.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    model = MLP(rng)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    model.linears = [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
                     for m in linears]
    model.norms = [bnfast.from_torch(m) for m in net if isinstance(m, torch.nn.BatchNorm1d)]

    def torch_eval(x):
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return model.eval(), losses, torch_eval


def fold(model):
    """Fold every batch norm into its Linear: a list of (weight, bias) for serving."""
    folded = [bnfast.fold_linear(w, b, bn) for (w, b), bn in zip(model.linears, model.norms)]
    return folded + [model.linears[-1]]


def serve(folded, x):
    """The serving path: matmul + bias (+ ReLU) per layer, nothing else."""
    h = x
    for w, b in folded[:-1]:
        h = relu(h @ w.T + b)
    w, b = folded[-1]
    return h @ w.T + b


def _time_us(fn, x, repeat=200):
    fn(x)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    return (time.perf_counter() - t0) / repeat * 1e6


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:       # the loss report needs at least one step
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main(argv=None):
    """Train, fold, check and time the MLP; returns a dict of the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch", action="store_true", help="train in PyTorch, import with from_torch")
    p.add_argument("--steps", type=_positive_int, default=30, help="SGD steps, >= 1 (default 30)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    trainer = train_torch if args.torch else train_bnfast
    model, losses, torch_eval = trainer(rng, args.steps)
    print(f"trained {len(losses)} steps with {'PyTorch' if args.torch else 'bnfast'}: "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    folded = fold(model)
    x, y = make_data(rng, 256)
    unfolded_out = model.forward(x)          # eval mode: running statistics
    folded_out = serve(folded, x)
    err = float(np.max(np.abs(folded_out - unfolded_out)))
    scale = float(np.max(np.abs(unfolded_out)))
    print(f"folded vs unfolded eval output: max |diff| = {err:.2e} (output scale {scale:.2f})")
    np.testing.assert_allclose(folded_out, unfolded_out, rtol=1e-4, atol=1e-5)
    result = {"losses": losses, "max_abs_diff": err}
    if torch_eval is not None:
        terr = float(np.max(np.abs(folded_out - torch_eval(x))))
        print(f"folded vs PyTorch eval output: max |diff| = {terr:.2e}")
        np.testing.assert_allclose(folded_out, torch_eval(x), rtol=1e-4, atol=1e-5)
        result["max_abs_diff_torch"] = terr

    one = x[:1]
    t_unfolded = _time_us(model.forward, one)
    t_folded = _time_us(lambda v: serve(folded, v), one)
    print(f"one sample: unfolded {t_unfolded:.1f} us, folded {t_folded:.1f} us")
    result.update(us_unfolded=t_unfolded, us_folded=t_folded)
    return result


if __name__ == "__main__":
    main()
