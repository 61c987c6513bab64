"""pytest-benchmark suite: fastrnn against stock Keras (and PyTorch) on the
issue-4 grid.  Run it with ``pytest bench/ --benchmark-only`` (see
bench/README.md); the normal ``pytest`` run does not collect it.

Every test is parametrized by ``case`` (a ``fastrnn.bench.Case``) and
``pass_`` (``"fwd"`` or ``"fwd+bwd"``); its benchmark group is
``fastrnn.bench.group_name(case, pass_)``, e.g. ``lstm-32x100x64x128-fwd``, so
each group of the report is one side-by-side comparison.
"""
import pytest

from fastrnn import bench


def pytest_addoption(parser):
    parser.addoption(
        "--fastrnn-shapes", metavar="SPEC", default=None,
        help="fastrnn bench: comma-separated LAYER:BxTxIxH shapes to run instead "
             "of the issue-4 grid (same syntax as `fastrnn bench --shapes`), or "
             "'quick' for fastrnn.bench.QUICK_GRID")


def _cases(config):
    spec = config.getoption("--fastrnn-shapes")
    if spec is None:
        return bench.GRID
    if spec == "quick":
        return bench.QUICK_GRID
    try:
        return bench.parse_shapes(spec)
    except ValueError as exc:
        raise pytest.UsageError(f"--fastrnn-shapes: {exc}") from None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", _cases(metafunc.config), ids=str)
    if "pass_" in metafunc.fixturenames:
        metafunc.parametrize("pass_", bench.PASSES)


@pytest.fixture
def run_benchmark(benchmark):
    """``run_benchmark(contender, case, pass_)``: build the contender's runner
    (skipping the test when it cannot run here), warm it up (tf.function
    tracing, JIT compilation) and benchmark it in the comparison's group."""
    def run(contender, case, pass_):
        try:
            runner = bench.build_runner(contender, case, pass_)
        except bench.ContenderUnavailable as exc:
            pytest.skip(str(exc))
        benchmark.group = bench.group_name(case, pass_)
        benchmark.name = f"{contender} {bench.group_name(case, pass_)}"
        benchmark.extra_info.update(
            contender=contender, layer=case.layer, B=case.B, T=case.T, I=case.I,
            H=case.H, pass_=pass_, gflop=bench.flops(case, pass_) / 1e9,
            keras_anchor_ms=bench.KERAS_ANCHORS_MS.get(case, (None, None))[
                bench.PASSES.index(pass_)])
        runner()
        runner()
        return benchmark(runner)
    return run
