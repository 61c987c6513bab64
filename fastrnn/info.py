"""The ``fastrnn info`` report: what fastrnn runs with on this machine.

:func:`collect` returns the facts as an ordered dict of label -> text;
:func:`report` formats them.  Nothing here imports TensorFlow (its version
comes from the installed package's metadata).
"""
import importlib
import importlib.util
import os
import platform
import warnings
from importlib import metadata

from . import __version__, _backend


def _backends():
    available = _backend.available_backends()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            chosen = _backend.resolve("auto")
        except ValueError as exc:
            chosen = f"none ({exc})"
    env = os.environ.get(_backend.ENV_VAR)
    how = f"{_backend.ENV_VAR}={env}" if env else "the fastest available"
    lines = [f"{', '.join(available)} (available); chosen: {chosen} ({how})"]
    for name in _backend.BACKENDS:
        if name not in available:
            lines.append(f"{name} unavailable: {_backend._failed.get(name, 'unknown reason')}")
    return "\n".join(lines)


def _threads():
    env = os.environ.get("OMP_NUM_THREADS")
    source = f"OMP_NUM_THREADS={env}" if env else "the cores this process may use"
    return f"{_backend.get_num_threads()} (default from {source}; set with " \
           f"fastrnn.set_num_threads)"


def _blas():
    try:
        import scipy
        deps = scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception as exc:  # an old SciPy without mode="dicts", or no SciPy
        return f"unknown ({type(exc).__name__}: {exc})"
    text = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    config = deps.get("openblas configuration")
    if config:
        text += f" [{config}]"
    return f"{text} (SciPy {scipy.__version__}'s, used through scipy.linalg.cython_blas)"


def _build():
    """The compiled extension's build facts: compiler, threads, others."""
    try:
        cy = importlib.import_module("fastrnn._cykernels")
    except Exception as exc:
        return {"compiled extension": f"not available ({type(exc).__name__}: {exc})"}
    if not hasattr(cy, "build_info"):
        return {"compiled extension": "built, but reports no build_info()"}
    info = dict(cy.build_info())
    facts = {"compiler": str(info.pop("compiler", "unknown")),
             "kernel threads": str(info.pop("threads", "unknown"))}
    facts.update({k: str(v) for k, v in info.items()})
    return facts


def _version(module, distributions):
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not installed"
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "installed (version unknown)"


def collect():
    """The report's facts, label -> text, in display order."""
    import numpy
    facts = {"fastrnn": __version__,
             "python": f"{platform.python_version()} ({platform.machine()}, "
                       f"{platform.system()})",
             "backends": _backends(),
             "threads": _threads(),
             "BLAS": _blas()}
    facts.update(_build())
    facts.update({
        "numpy": numpy.__version__,
        "numba": _version("numba", ["numba"]),
        "TensorFlow": _version("tensorflow", ["tensorflow", "tensorflow-cpu",
                                              "tensorflow-macos", "tensorflow-intel",
                                              "tf-nightly"]),
        "Keras": _version("keras", ["keras", "keras-nightly"]),
    })
    return facts


def report():
    """The ``fastrnn info`` text."""
    facts = collect()
    width = max(map(len, facts)) + 2
    lines = []
    for label, text in facts.items():
        first, *rest = text.split("\n")
        lines.append(f"{label + ':':{width}s}{first}")
        lines.extend(" " * width + line for line in rest)
    return "\n".join(lines)
