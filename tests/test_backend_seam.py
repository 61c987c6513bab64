"""The backend seam (fastrnn._backend): which backends exist, how one is
chosen (argument, FASTRNN_BACKEND), workspaces remembering their backend,
the thread-count setting, and imports staying light."""
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastrnn
from fastrnn import _backend, ops

ALL = ("cython", "numba", "numpy")
REPO = Path(__file__).resolve().parents[1]


def test_available_backends_is_an_ordered_subset():
    names = fastrnn.available_backends()
    assert isinstance(names, tuple)
    assert "numpy" in names
    assert names == tuple(n for n in ALL if n in names)


def test_compiled_backends_are_available():
    """The issue's definition of done: all three backends run here."""
    assert fastrnn.available_backends() == ALL


def _small(backend="auto"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    return ops.lstm_forward(x, rng.standard_normal((4, 8)),
                            rng.standard_normal((2, 8)),
                            return_workspace=True, backend=backend)


def test_explicit_backend_is_used(backend):
    assert _small(backend).workspace.backend == backend


@pytest.mark.parametrize("spelling", [str.lower, str.upper, lambda s: f" {s} "],
                         ids=["lower", "upper", "spaces"])
def test_environment_variable_selects_backend(backend, spelling, monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", spelling(backend))
    assert _small().workspace.backend == backend
    x = np.zeros((1, 2, 3))
    r = ops.rnn_forward(x, np.zeros((3, 4)), np.zeros((4, 4)),
                        return_workspace=True)
    assert r.workspace.backend == backend


@pytest.mark.parametrize("value", [None, "", "auto", "AUTO"])
def test_auto_picks_the_fastest(value, monkeypatch):
    if value is None:
        monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FASTRNN_BACKEND", value)
    assert _small().workspace.backend == fastrnn.available_backends()[0]
    assert _small("auto").workspace.backend == fastrnn.available_backends()[0]


def _simulate_failed(monkeypatch, name):
    monkeypatch.delitem(_backend._loaded, name, raising=False)
    monkeypatch.setitem(_backend._failed, name, "ImportError: simulated")


def test_fallback_warns_once(monkeypatch):
    """Without the compiled backend, "auto" falls back with one warning that
    names the reason."""
    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", False)
    _simulate_failed(monkeypatch, "cython")
    fallback = fastrnn.available_backends()[0]
    with pytest.warns(RuntimeWarning, match=rf"simulated.*{fallback}"):
        assert _small().workspace.backend == fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _small().workspace.backend == fallback


def test_explicit_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", fastrnn.available_backends()[0])
    assert _small("numpy").workspace.backend == "numpy"


def test_unknown_backend_argument_lists_valid_ones():
    with pytest.raises(ValueError, match=r"backend .*cython.*numba.*numpy.*'tpu'"):
        _small("tpu")


def test_unknown_backend_in_environment_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"FASTRNN_BACKEND.*tpu.*cython.*numba.*numpy"):
        _small()


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    """A backend that failed to load is reported with the reason and the
    backends that are available."""
    _simulate_failed(monkeypatch, "cython")
    assert "cython" not in fastrnn.available_backends()
    with pytest.raises(ValueError, match=r"'cython' is not available.*simulated.*numpy"):
        _small("cython")


class _Spy:
    """Wraps a kernel module and records which entry points were called."""

    def __init__(self, module, calls, name):
        self._module, self._calls, self._name = module, calls, name

    def __getattr__(self, attr):
        fn = getattr(self._module, attr)

        def wrapper(*args, **kwargs):
            self._calls.append((self._name, attr))
            return fn(*args, **kwargs)
        return wrapper


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_backward_runs_on_the_workspace_backend(backend, kind, monkeypatch,
                                                rng, kernels):
    """Backward uses the backend recorded in the workspace, whatever
    FASTRNN_BACKEND says by then; results match the reference."""
    calls = []
    for name in fastrnn.available_backends():
        if _backend._loaded.get(name) is not None:
            monkeypatch.setitem(_backend._loaded, name,
                                _Spy(_backend._loaded[name], calls, name))
    p = kernels.make_problem(rng, kind, 2, 4, 3, 5, np.float64, mask="random")
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"])
    if kind == "lstm":
        ws = ops.lstm_forward(*args, p["c0"], mask=p["mask"], backend=backend,
                              return_workspace=True).workspace
    else:
        ws = ops.rnn_forward(*args, mask=p["mask"], backend=backend,
                             return_workspace=True).workspace
    assert ws.backend == backend
    assert all(name == backend for name, _ in calls)
    others = [n for n in fastrnn.available_backends() if n != backend]
    monkeypatch.setenv("FASTRNN_BACKEND", others[0] if others else backend)
    del calls[:]
    if kind == "lstm":
        g = ops.lstm_backward(ws, p["d_outputs"], p["d_h"], p["d_c"])
    else:
        g = ops.rnn_backward(ws, p["d_outputs"], p["d_h"])
    expected_calls = [] if backend == "numpy" else [(backend, f"{kind}_backward")]
    assert calls == expected_calls
    np.testing.assert_allclose(g.x, kernels.run_reference(p)["d_x"],
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True],
                         ids=["zero", "negative", "float", "str", "None", "bool"])
def test_set_num_threads_rejects_non_positive_ints(bad, monkeypatch):
    monkeypatch.setattr(_backend, "_num_threads", None)
    before = fastrnn.get_num_threads()
    with pytest.raises((ValueError, TypeError), match=r"\bn must be"):
        fastrnn.set_num_threads(bad)
    assert fastrnn.get_num_threads() == before


def test_set_num_threads(monkeypatch):
    monkeypatch.setattr(_backend, "_num_threads", None)
    fastrnn.set_num_threads(3)
    assert fastrnn.get_num_threads() == 3


@pytest.mark.parametrize("env,expected", [("3", 3), ("5,2", 5)])
def test_default_thread_count_follows_omp_num_threads(env, expected,
                                                      monkeypatch):
    monkeypatch.setattr(_backend, "_num_threads", None)
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert fastrnn.get_num_threads() == expected


def test_default_thread_count_without_omp_num_threads(monkeypatch):
    monkeypatch.setattr(_backend, "_num_threads", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fastrnn.get_num_threads() >= 1


def test_import_is_light():
    """``import fastrnn; import fastrnn.ops`` imports neither TensorFlow nor
    Keras nor any compiled backend (those load on first use)."""
    code = ("import sys, fastrnn, fastrnn.ops; "
            "heavy = [m for m in ('tensorflow', 'keras', 'fastrnn._cykernels', "
            "'fastrnn._numba_kernels', 'numba') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
