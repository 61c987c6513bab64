"""The ``fastrnn`` command (fastrnn.cli, fastrnn.demo, fastrnn.info) on tiny
settings: ``info``, ``demo`` (with and without the comparison, ``--save``),
``generate`` from the saved model, ``bench`` dispatch, and the one-line
errors a user meets.  Runs ``python -m fastrnn`` in subprocesses, and
``fastrnn.cli.main`` in-process where that is cheap.  No timing assertions.
"""
import gzip
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastrnn
from fastrnn import cli, demo

TINY = ["--epochs", "2", "--units", "16", "--seq-len", "20", "--max-chars", "3000",
        "--batch-size", "32", "--sample-length", "40"]
ROW = re.compile(r"^(fastrnn\.keras\.LSTM|keras\.layers\.LSTM) +([\d.]+) +([\d.]+) +([\d.]+)$",
                 re.MULTILINE)


# Subprocesses import the same fastrnn as this process (the installed one, or
# the source tree), whatever the current folder holds.
ROOT = str(Path(fastrnn.__file__).resolve().parent.parent)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run(*args, code=None, timeout=300):
    """Run ``python -m fastrnn ARGS`` (or ``python -c CODE ARGS``)."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fastrnn"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True,
                          text=True, env=_env(), cwd=ROOT, timeout=timeout)


def assert_one_line_error(proc, *words, rc=1):
    """A user error: status ``rc``, one ``fastrnn: error:`` line holding
    ``words`` on stderr, no traceback."""
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastrnn: error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


# ------------------------------------------------------------------ info ---
def test_info_subprocess_reports_version_backends_and_packages():
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(rf"^fastrnn: +{re.escape(fastrnn.__version__)}$", out, re.MULTILINE)
    backends = re.search(r"^backends: +(.*)$", out, re.MULTILINE).group(1)
    for name in fastrnn.available_backends():
        assert name in backends
    assert f"chosen: {fastrnn.available_backends()[0]}" in backends
    assert re.search(rf"^threads: +{fastrnn.get_num_threads()} ", out, re.MULTILINE)
    for label in ("BLAS:", "TensorFlow:", "Keras:", "numpy:"):
        assert label in out


def test_info_in_process(capsys, monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "numpy")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "chosen: numpy (FASTRNN_BACKEND=numpy)" in out
    # The compiled extension's build facts, or why they are missing.
    assert "compiler:" in out or "compiled extension:" in out


def test_console_script_when_installed():
    script = Path(sys.executable).with_name("fastrnn")
    if not script.exists():
        pytest.skip("the fastrnn console script exists only after pip install")
    proc = subprocess.run([str(script), "info"], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert fastrnn.__version__ in proc.stdout


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert fastrnn.__version__ in capsys.readouterr().out


# ------------------------------------------------------------------ demo ---
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny ``python -m fastrnn demo --save``: (process, saved path)."""
    pytest.importorskip("tensorflow")
    path = tmp_path_factory.mktemp("demo") / "model.keras"
    proc = run("demo", *TINY, "--save", path, "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, path


def test_demo_prints_timings_speedup_losses_and_sample(demo_run):
    proc, _ = demo_run
    out = proc.stdout
    rows = {name: tuple(map(float, nums)) for name, *nums in ROW.findall(out)}
    assert set(rows) == {"fastrnn.keras.LSTM", "keras.layers.LSTM"}, out
    for per_epoch, first_epoch, loss in rows.values():
        assert per_epoch > 0 and first_epoch > 0
        assert 0 < loss < 10
    # Same initial weights, same batches: the final losses agree closely.
    fast_loss, stock_loss = rows["fastrnn.keras.LSTM"][2], rows["keras.layers.LSTM"][2]
    assert abs(fast_loss - stock_loss) < 0.02 * stock_loss, (fast_loss, stock_loss)
    assert "epoch 1, which includes tracing, is not counted" in out
    speedup = re.search(r"speed-up of fastrnn\.keras\.LSTM over keras\.layers\.LSTM: "
                        r"([\d.]+)x", out)
    assert speedup and float(speedup.group(1)) > 0
    assert "Epoch 2/2" in out  # Keras's progress output
    assert re.search(r"training with fastrnn\.keras\.LSTM \(\w+ backend, 1 thread\)", out)
    sampled = out.split("sampled text (temperature 0.8):\n", 1)[1]
    assert len(sampled.strip()) >= 20


def test_generate_from_saved_model(demo_run):
    _, path = demo_run
    proc = run("generate", path, "--prompt", "First", "--length", "30", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.rstrip("\n")
    assert text.startswith("First")
    assert len(text) == len("First") + 30


def test_saved_model_carries_vocabulary_and_samples_reproducibly(demo_run, capsys):
    _, path = demo_run
    model, chars, seq_len = demo.load_model(str(path))
    text = demo.load_text(None, 3000)
    assert chars == demo.build_vocabulary(text)
    assert seq_len == 20
    assert model.output_shape[-1] == len(chars)
    args = ["generate", str(path), "--prompt", "the", "--length", "25", "--seed", "7"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first
    assert set(first.rstrip("\n")) <= set(chars)


def test_demo_no_compare_on_own_text(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    text = tmp_path / "abc.txt"
    text.write_text("abcab cabca bcabc\n" * 60, encoding="utf-8")
    rc = cli.main(["demo", "--text", str(text), "--no-compare", "--epochs", "1",
                   "--units", "8", "--seq-len", "10", "--sample-length", "15",
                   "--seed", "1", "--backend", "numpy"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = dict((name, nums) for name, *nums in ROW.findall(out))
    assert list(rows) == ["fastrnn.keras.LSTM"]
    assert "keras.layers.LSTM" not in out and "speed-up" not in out
    assert "the only epoch, which includes tracing" in out
    assert "training with fastrnn.keras.LSTM (numpy backend, " in out
    assert f"{text}: 1,080 characters, 5 distinct; 107 windows of 10" in out
    sampled = out.split("sampled text (temperature 0.8):\n", 1)[1].strip("\n")
    assert len(sampled) == 15 and set(sampled) <= set("abc \n")


# ------------------------------------------------------- data functions ---
def test_bundled_text_is_small_and_named():
    data = Path(demo.__file__).parent / "data"
    blob = (data / demo.DATA_FILE).read_bytes()
    assert len(blob) < 200_000
    text = gzip.decompress(blob).decode("utf-8")
    assert 100_000 < len(text) < 500_000 and text.startswith("First Citizen:")
    assert "char-rnn" in (data / "README.md").read_text()
    assert demo.load_text(None, 100) == text[:100]


def test_windows_pair_each_char_with_the_next():
    chars = demo.build_vocabulary("hello world")
    assert chars == " dehlorw"
    ids = demo.encode("hello world", chars)
    x, y = demo.make_windows(ids, 3)
    assert x.shape == y.shape == (3, 3) and x.dtype == np.int32
    decode = lambda row: "".join(chars[i] for i in row)  # noqa: E731
    assert [decode(r) for r in x] == ["hel", "lo ", "wor"]
    assert [decode(r) for r in y] == ["ell", "o w", "orl"]
    with pytest.raises(demo.DemoError, match="at least 12"):
        demo.make_windows(ids, 11)
    with pytest.raises(demo.DemoError, match="'z'"):
        demo.encode("zoo", chars)


def test_steady_epoch_time_skips_the_first():
    assert demo.steady_epoch_time([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert demo.steady_epoch_time([5.0]) == 5.0


# ----------------------------------------------------------------- bench ---
def test_bench_dispatches_remaining_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("fastrnn.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fastrnn.bench", fake)
    assert cli.main(["bench", "--quick", "--json", "x.json"]) == 3
    assert seen == [["--quick", "--json", "x.json"]]


# ----------------------------------------------------------- user errors ---
BLOCK_TF = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; "
            "from fastrnn.cli import main; sys.exit(main(sys.argv[1:]))")


def test_tensorflow_missing_is_one_line_with_install_hint():
    proc = run("demo", *TINY, code=BLOCK_TF)
    assert_one_line_error(proc, "TensorFlow", 'pip install "fastrnn[tensorflow]"')


def test_tensorflow_missing_for_generate(tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(b"not a model")
    proc = run("generate", path, code=BLOCK_TF)
    assert_one_line_error(proc, 'pip install "fastrnn[tensorflow]"')


@pytest.mark.parametrize("content, words", [
    (None, ["cannot read it"]),
    (b"", ["the file is empty"]),
    (b"\xff\xfe\xfa bad bytes", ["not UTF-8"]),
    (b"too short", ["9 characters", "--seq-len 20", "at least 21"]),
], ids=["missing", "empty", "not-utf8", "too-short"])
def test_bad_text_is_one_line(tmp_path, content, words):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    proc = run("demo", "--text", path, "--seq-len", "20")
    assert_one_line_error(proc, f"--text {path}", *words)


def test_text_that_is_a_folder_is_one_line(tmp_path):
    assert_one_line_error(run("demo", "--text", tmp_path), "cannot read it")


@pytest.mark.parametrize("save, words", [
    ("model.h5", ["must end in .keras"]),
    ("no/such/folder/model.keras", ["does not exist"]),
])
def test_bad_save_path_fails_before_training(tmp_path, save, words):
    proc = run("demo", "--save", tmp_path / save)
    assert_one_line_error(proc, "--save", *words)


@pytest.mark.parametrize("args", [
    ["demo", "--epochs", "zero"],
    ["demo", "--units", "0"],
    ["demo", "--learning-rate", "-1"],
    ["demo", "--no-such-flag"],
    ["demo", "--backend", "fortran"],
    ["generate"],
    ["generate", "m.keras", "--temperature", "0"],
    ["frobnicate"],
    [],
])
def test_bad_flags_give_usage_errors(args):
    proc = run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: fastrnn")
    assert "error:" in proc.stderr.splitlines()[-1]


def test_generate_errors_are_one_line(tmp_path, demo_run):
    _, path = demo_run
    assert_one_line_error(run("generate", tmp_path / "none.keras"), "no such file")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip file")
    assert_one_line_error(run("generate", junk), "cannot load it")
    assert_one_line_error(run("generate", path, "--prompt", "\u20ac"),
                          "vocabulary lacks", "\u20ac")
