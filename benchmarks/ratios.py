"""Ratio table (Markdown) and the issue's speed targets from a saved pytest-benchmark JSON.

    pytest benchmarks/ -p no:cacheprovider --benchmark-only --benchmark-json=run.json
    python benchmarks/ratios.py run.json                  # ratio table + targets
    python benchmarks/ratios.py run.json --threads 1 --dtype float32
    python benchmarks/ratios.py .benchmarks/*/0001_*.json --targets-only

Several files are merged where their benchmark groups do not overlap (say, a run per
layout); files that repeat a group (runs of the same cases) are reported one by one.

bnfast/copy = bnfast median / np.copyto median in the same group (1.00 = the memory-bandwidth roofline);
Peer/bnfast = how many times longer the peer takes.
"""
import argparse
import importlib.machinery
import json
import os
import sys

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if any(os.path.exists(os.path.join(_CHECKOUT, "bnfast", "_core" + suffix))
       for suffix in importlib.machinery.EXTENSION_SUFFIXES):   # built in place: that one
    sys.path.insert(0, _CHECKOUT)

from bnfast._bench import format_table, legend, results_from_pytest  # noqa: E402

LARGE = {"NCHW": "64x256x28x28-NCHW", "NHWC": "64x28x28x256-NHWC", "NC": "200704x64"}


def _index(results):
    return {(r["op"], r["case"], r["dtype"], r["threads"], r["impl"]): r["seconds"] for r in results}


def targets(results, dtype="float32"):
    """[(target, case, measured, limit, met)] for the targets of issue 3 found in ``results``."""
    t = _index(results)
    threads = sorted({r["threads"] for r in results})
    one, many = (threads[0], threads[-1]) if threads else (1, 1)
    rows = []

    def ratio(a, b):
        return a / b if a is not None and b else None

    def get(op, case, impl, th=one):
        return t.get((op, case, dtype, th, impl))

    def add(name, case, value, limit, kind="<="):
        if value is None:
            rows.append((name, case, None, f"{kind} {limit}", None))
            return
        met = value <= limit if kind == "<=" else value >= limit
        rows.append((name, case, value, f"{kind} {limit}", met))

    c = "1x64"
    add(f"FrozenBatchNorm out= / copy ({one}t)", c, ratio(get("eval", c, "frozen-out"), get("eval", c, "copy")), 1.0)
    add(f"FrozenBatchNorm alloc / copy ({one}t)", c, ratio(get("eval", c, "frozen"), get("eval", c, "copy")), 1.5)
    add(f"PyTorch eval / FrozenBatchNorm alloc ({one}t)", c, ratio(get("eval", c, "torch"), get("eval", c, "frozen")), 10, ">=")
    add(f"batch_norm eval / copy ({one}t)", c, ratio(get("eval", c, "bnfast-alloc"), get("eval", c, "copy")), 3.0)
    add(f"batch_norm eval out= / copy ({one}t)", c, ratio(get("eval", c, "bnfast"), get("eval", c, "copy")), 3.0)
    for lay, case in LARGE.items():
        add(f"eval out= / copy ({one}t)", case, ratio(get("eval", case, "bnfast"), get("eval", case, "copy")), 1.10)
    for lay, case in LARGE.items():
        add(f"train forward / copy ({one}t)", case, ratio(get("train", case, "bnfast"), get("train", case, "copy")),
            1.3 if lay == "NCHW" else 1.5)
        add(f"PyTorch train / bnfast ({one}t)", case, ratio(get("train", case, "torch"), get("train", case, "bnfast")), 5, ">=")
    for lay, case in LARGE.items():
        add(f"backward / copy ({one}t)", case, ratio(get("backward", case, "bnfast"), get("backward", case, "copy")),
            1.8 if lay == "NCHW" else 2.0)
        add(f"PyTorch fwd+bwd / bnfast ({one}t)", case,
            ratio(get("fwd_bwd", case, "torch"), get("fwd_bwd", case, "bnfast")), 4, ">=")
    if many > 1:
        case = LARGE["NCHW"]
        add(f"eval out= / {many}-thread copy ({many}t)", case,
            ratio(get("eval", case, "bnfast", many), get("eval", case, "copy", many)), 1.15)
        add(f"train forward / {many}-thread copy ({many}t)", case,
            ratio(get("train", case, "bnfast", many), get("train", case, "copy", many)), 1.4)
        for case in ("1x64", "32x256", "256x1024"):
            for op in ("eval", "train", "backward"):
                if case == "1x64" and op != "eval":
                    continue
                add(f"{op}: {many} threads / 1 thread", case,
                    ratio(get(op, case, "bnfast", many), get(op, case, "bnfast", one)), 1.10)
    return rows


def format_targets(rows):
    out = ["| target (issue 3) | case | measured | limit | met |", "|---|---|---:|---|---|"]
    for name, case, v, lim, met in rows:
        out.append(f"| {name} | {case} | {'-' if v is None else f'{v:.2f}'} | {lim} | "
                   f"{'-' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json / autosave)")
    p.add_argument("--threads", type=int, help="only this thread count")
    p.add_argument("--dtype", help="only this dtype (float32, float64)")
    p.add_argument("--targets-only", action="store_true", help="print only the targets table")
    a = p.parse_args(argv)
    runs = []
    for path in a.json:
        with open(path) as f:
            runs.append((path, results_from_pytest(json.load(f).get("benchmarks", []))))
    # A ratio is only meaningful within one run (a group's bnfast and its copy measured
    # together): files that share a group are reported one by one, not merged, where a
    # later file's times would silently replace an earlier one's
    groups = [{(r["op"], r["case"], r["dtype"], r["threads"]) for r in res} for _, res in runs]
    shared = len(groups) > 1 and sum(len(g) for g in groups) > len(set().union(*groups))
    if shared:
        print(f"{len(runs)} runs share benchmark groups: each is reported on its own", file=sys.stderr)
    else:
        runs = [(None, [r for _, res in runs for r in res])]
    for i, (path, results) in enumerate(runs):
        if path is not None:
            print(f"{'' if i == 0 else chr(10)}## {path}{chr(10)}")
        sel = [r for r in results if (a.threads is None or r["threads"] == a.threads)
               and (a.dtype is None or r["dtype"] == a.dtype)]
        if not a.targets_only:
            print(format_table(sel, markdown=True))
            print()
            print(legend(markdown=True))
            print()
        print(format_targets(targets(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
