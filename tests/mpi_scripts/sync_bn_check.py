"""Run under ``mpiexec -n P python sync_bn_check.py P``: SyncBatchNorm over real MPI
processes, the cases of sync_cases.py. Launched by tests/test_distributed.py.

Prints ``rank R/P: N checks ok`` per rank and exits 0; or prints the failures and exits
1; exits 3 when mpi4py is missing, 4 when COMM_WORLD does not have P ranks (mpiexec and
mpi4py from different MPI installations); aborts the job (non-zero) on an exception.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from mpi4py import MPI
except ImportError as e:
    print(f"mpi4py is not importable: {e}", flush=True)
    sys.exit(3)

import numpy as np  # noqa: E402

COMM = MPI.COMM_WORLD


def main():
    rank, size = COMM.Get_rank(), COMM.Get_size()
    expected = int(sys.argv[1]) if len(sys.argv) > 1 else size
    if size != expected:
        print(f"rank {rank}: COMM_WORLD has {size} ranks, expected {expected}: mpiexec "
              f"and mpi4py come from different MPI installations", flush=True)
        sys.exit(4)
    from sync_cases import run_all
    n, failures = run_all(COMM)
    nbad = np.empty(size)
    COMM.Allgather(np.array([float(len(failures))]), nbad)
    for f in failures:
        print(f"rank {rank}: FAIL {f}", flush=True)
    if nbad.any():
        sys.exit(1)
    print(f"rank {rank}/{size}: {n} checks ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        COMM.Abort(2)
