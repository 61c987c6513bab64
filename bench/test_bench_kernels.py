"""Kernel-level contenders: fastrnn.ops on NumPy arrays, one per backend
(benchmarks of unavailable backends are skipped)."""
import pytest

from fastrnn._backend import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops(run_benchmark, backend, case, pass_):
    run_benchmark(f"ops[{backend}]", case, pass_)
