"""`fastrnn bench` (fastrnn.bench.main) on tiny shapes: the JSON report's
fields, the printed tables, and argument errors.  No timing assertions."""
import json
import sys

import numpy as np
import pytest

import fastrnn
from fastrnn import bench

TINY_LSTM = "lstm:2x4x3x5"
TINY_RNN = "rnn:2x4x3x5"


def _run(tmp_path, *args):
    path = tmp_path / "report.json"
    rc = bench.main(["--quick", "--repeats", "2", "--quiet", "--no-torch",
                     "--json", str(path), *args])
    return rc, json.loads(path.read_text())


def test_flop_formulas():
    lstm = bench.Case("lstm", 32, 100, 64, 128)
    assert bench.flops(lstm, "fwd") == 2 * 32 * (64 + 128) * 4 * 128 * 100
    assert bench.flops(lstm, "fwd+bwd") == 3 * bench.flops(lstm, "fwd")
    rnn = bench.Case("rnn", 1, 100, 128, 256)
    assert bench.flops(rnn, "fwd") == 2 * 1 * (128 + 256) * 256 * 100


def test_grid_is_issue_4s():
    assert [str(c) for c in bench.GRID] == [
        "lstm-1x100x128x256", "lstm-32x100x64x128", "lstm-64x50x256x256",
        "lstm-16x100x128x512", "lstm-128x20x32x64",
        "rnn-1x100x128x256", "rnn-32x100x64x128"]
    assert set(bench.KERAS_ANCHORS_MS) == set(bench.GRID)
    assert set(bench.QUICK_GRID) <= set(bench.GRID)


def test_parse_shapes():
    assert bench.parse_shapes("lstm:2x4x3x5, SimpleRNN:1x2x3x4") == (
        bench.Case("lstm", 2, 4, 3, 5), bench.Case("rnn", 1, 2, 3, 4))
    assert bench.parse_shapes(TINY_LSTM)[0].spec == TINY_LSTM
    for bad in ("gru:1x2x3x4", "lstm:1x2x3", "lstm:1x2x3x0", "lstm", ",", "rnn:axbxcxd"):
        with pytest.raises(ValueError, match="shapes"):
            bench.parse_shapes(bad)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "lstm:1x2"], "LAYER:BxTxIxH"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "-1"], "--threads"),
    (["--backend", "fortran"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_speedups(tmp_path):
    pytest.importorskip("matplotlib")
    row = {"contender": "keras", "median_ms": 2.0, "speedup": 1.0}
    report = {"groups": [
        {"name": f"lstm-2x4x3x5-{p}", "case": "lstm-2x4x3x5", "pass": p,
         "rows": [row, dict(row, contender="fastrnn.keras", speedup=4.0)]}
        for p in bench.PASSES]}
    bench.plot_speedups(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails
    with pytest.raises(SystemExit, match=r"fastrnn\[plot\]"):
        bench.main(["--shapes", TINY_RNN, "--plot", str(tmp_path / "p.png")])
    assert not (tmp_path / "p.png").exists()


def _check_group(report, group, layer, pass_, contenders):
    case = bench.Case(layer, 2, 4, 3, 5)
    assert group["name"] == f"{case}-{pass_}"
    assert (group["layer"], group["B"], group["T"], group["I"], group["H"],
            group["pass"]) == (layer, 2, 4, 3, 5, pass_)
    assert group["gflop"] == pytest.approx(bench.flops(case, pass_) / 1e9)
    assert group["keras_anchor_ms"] is None
    rows = {r["contender"]: r for r in group["rows"]}
    assert list(rows) == contenders
    for name, r in rows.items():
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
        assert r["median_ms"] == pytest.approx(float(np.median(r["times_ms"])))
        assert r["gflops"] == pytest.approx(group["gflop"] / (r["median_ms"] / 1e3))
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / report["sgemm_gflops"])
        if pass_ == "fwd":
            assert r["max_abs_err"] < 1e-5, name
        else:
            assert r["max_abs_err"] is None
    return rows


def test_quick_json_report_with_keras_and_memory(tmp_path, capsys):
    rc, report = _run(tmp_path, "--shapes", TINY_LSTM)
    assert rc == 0
    assert report["failed"] == {}
    assert report["sgemm_gflops"] == max(report["sgemm_gflops_start_end"]) > 0
    assert len(report["loadavg_start_end"]) == 2 and report["repeats"] == 2
    assert report["dtype"] == "float32"
    assert report["available_backends"] == list(fastrnn.available_backends())
    contenders = ["keras", "fastrnn.keras"] + [   # the reference only if asked
        f"ops[{b}]" for b in fastrnn.available_backends() if b != "numpy"]
    assert [g["pass"] for g in report["groups"]] == ["fwd", "fwd+bwd"]
    for g in report["groups"]:
        rows = _check_group(report, g, "lstm", g["pass"], contenders)
        assert rows["keras"]["speedup"] == 1.0
        for r in rows.values():
            assert r["speedup"] == pytest.approx(
                rows["keras"]["median_ms"] / r["median_ms"])
    memory = {m["contender"]: m for m in report["memory"]}
    assert sorted(memory) == ["fastrnn.keras", "keras"]
    for m in memory.values():
        assert m["case"] == "lstm-2x4x3x5" and m["error"] is None
        for key in ("peak_extra_bytes", "traced_extra_bytes", "pool_bytes"):
            assert isinstance(m[key], int) and m[key] >= 0
    out = capsys.readouterr().out
    assert "NumPy sgemm 1024^3 peak" in out
    assert "LSTM B=2 T=4 I=3 H=5  forward+backward" in out
    assert "Peak extra resident memory" in out
    assert "Speed-up of fastrnn.keras over stock Keras" in out


def test_report_records_the_environment(tmp_path, monkeypatch, capsys):
    """Variables that change what is measured are in the report and its
    header (OPENBLAS_CORETYPE with a warning); unset ones are not."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("FASTRNN_SPLIT", raising=False)
    rc, report = _run(tmp_path, "--shapes", TINY_RNN, "--no-keras",
                      "--no-memory", "--backend", "numpy")
    assert rc == 0
    assert report["environment"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert "FASTRNN_SPLIT" not in report["environment"]
    out = capsys.readouterr().out
    assert "environment: " in out and "OPENBLAS_CORETYPE=Haswell" in out
    assert "may run slower than this CPU can" in out


def test_time_alternating_settles_each_contender_before_timing_it():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.time_alternating(runners, repeats=4, warmup=2, settle=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    assert calls[:6] == list("aabbcc")                 # warm-ups
    rounds = calls[6:]
    assert len(rounds) == 4 * 3 * 2
    # each contender runs twice in a row (untimed, timed); the order rotates
    pairs = [rounds[i] for i in range(0, len(rounds), 2)]
    assert rounds[1::2] == pairs
    assert pairs == list("abc" "bca" "cab" "abc")


def test_no_keras_report_has_kernel_rows_only(tmp_path):
    rc, report = _run(tmp_path, "--shapes", TINY_RNN, "--no-keras",
                      "--no-memory", "--backend", "numpy")
    assert rc == 0 and report["failed"] == {}
    for g, pass_ in zip(report["groups"], bench.PASSES):
        rows = _check_group(report, g, "rnn", pass_, ["ops[numpy]"])
        assert rows["ops[numpy]"]["speedup"] is None
    assert report["memory"] == []


def test_runners_agree_with_the_reference():
    case = bench.Case("lstm", 2, 3, 4, 5)
    data = bench.make_data(case)
    want = np.asarray(bench.build_runner("ops[numpy]", case, "fwd", data)())
    assert want.shape == (2, 3, 5)
    for b in fastrnn.available_backends():
        got = bench.build_runner(f"ops[{b}]", case, "fwd", data)()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grads = bench.build_runner("ops[numpy]", case, "fwd+bwd", data)()
    assert grads.x.shape == (2, 3, 4) and grads.kernel.shape == (4, 20)
    with pytest.raises(ValueError, match="contender"):
        bench.build_runner("caffe", case, "fwd")
    with pytest.raises(ValueError, match="pass_"):
        bench.build_runner("ops[numpy]", case, "backward")


def test_a_failing_contender_is_reported_not_fatal(monkeypatch, capsys):
    real = bench.build_runner

    def build_runner(name, case, pass_, data=None):
        if pass_ == "fwd+bwd":
            def broken():
                raise RuntimeError("boom")
            return broken
        return real(name, case, pass_, data)

    monkeypatch.setattr(bench, "build_runner", build_runner)
    rc = bench.main(["--shapes", TINY_RNN, "--no-keras", "--no-memory", "--backend",
                     "numpy", "--repeats", "2", "--quiet"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAILED ops[numpy] rnn-2x4x3x5-fwd+bwd: RuntimeError: boom" in out
    assert "ops[numpy]" in out.split("forward+backward")[0]   # the fwd rows ran


def test_report_counts_the_kernel_thread_teams(tmp_path, capsys):
    """The compiled backends' team counters over the run are in the report
    and its text (what ran threaded, what stalled, what backed off)."""
    compiled = [b for b in ("cython", "numba") if b in fastrnn.available_backends()]
    args = ["--shapes", TINY_RNN, "--no-keras", "--no-memory", "--repeats", "2"]
    for b in compiled:
        args += ["--backend", b]
    rc, report = _run(tmp_path, *args)
    assert rc == 0
    assert sorted(report["teams"]) == sorted(compiled)
    for counts in report["teams"].values():
        assert set(counts) >= {"team_calls", "stalled_calls", "backoff_calls"}
        assert all(isinstance(v, int) and v >= 0 for v in counts.values())
    out = capsys.readouterr().out
    if compiled:
        assert "Kernel thread teams during the run" in out
