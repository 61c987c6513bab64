"""The one seam where fastrnn picks a backend and a thread count.

The compiled modules are imported lazily, on first use, so that
``import fastrnn`` stays cheap and never compiles anything.
"""
import importlib
import os
import threading
import warnings

BACKENDS = ("cython", "numba", "numpy")
ENV_VAR = "FASTRNN_BACKEND"

_MODULES = {
    "cython": "fastrnn._cykernels",
    "numba": "fastrnn._numba_kernels",
    "numpy": None,
}
_lock = threading.Lock()
_loaded = {}          # name -> module (or None for numpy)
_failed = {}          # name -> reason string
_warned = False
_num_threads = None


def _try_load(name):
    with _lock:
        if name in _loaded:
            return True
        if name in _failed:
            return False
        modname = _MODULES[name]
        if modname is None:
            _loaded[name] = None
            return True
        try:
            mod = importlib.import_module(modname)
            if name == "cython":
                _give_workers_serial_blas(mod)
            _loaded[name] = mod
            return True
        except Exception as exc:  # ImportError, numba compile errors, ...
            _failed[name] = f"{type(exc).__name__}: {exc}"
            return False


def available_backends():
    """The backends that can run here, as a tuple, fastest first."""
    return tuple(name for name in BACKENDS if _try_load(name))


def resolve(backend="auto"):
    """Return the name of the backend to use for ``backend``.

    ``"auto"`` means the ``FASTRNN_BACKEND`` environment variable if it is
    set, else the fastest available backend.  An explicit choice that is not
    available raises ``ValueError`` listing the available ones.
    """
    global _warned
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of "
                        f"{('auto',) + BACKENDS}, got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not a backend; "
                                 f"expected one of {BACKENDS}")
            backend = env
        else:
            for name in BACKENDS:
                if _try_load(name):
                    if name != BACKENDS[0] and not _warned:
                        _warned = True
                        reasons = "; ".join(f"{k}: {v}" for k, v in _failed.items())
                        warnings.warn(f"fastrnn: compiled backends unavailable "
                                      f"({reasons}); falling back to {name!r}",
                                      RuntimeWarning, stacklevel=3)
                    return name
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, "
                         f"got {backend!r}")
    if not _try_load(backend):
        raise ValueError(f"backend {backend!r} is not available "
                         f"({_failed.get(backend)}); available backends: "
                         f"{available_backends()}")
    return backend


def module(name):
    """The kernel module of a loaded backend."""
    if not _try_load(name):
        raise ValueError(f"backend {name!r} is not available")
    return _loaded[name]


def _default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_num_threads(n):
    """Set the number of threads fastrnn's kernels use (default:
    ``OMP_NUM_THREADS``, else the cores this process may run on)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _num_threads = n


def get_num_threads():
    """The number of threads fastrnn's kernels use."""
    return _num_threads if _num_threads is not None else _default_threads()


def _local_threads_setter():
    """OpenBLAS's ``openblas_set_num_threads_local`` in SciPy's BLAS (the one
    ``scipy.linalg.cython_blas`` calls), as a ctypes function, or None.

    It sets the BLAS thread count of the calling thread only, so fastrnn
    never changes what other threads (or other libraries) get.
    """
    try:
        import ctypes
        import scipy.linalg  # noqa: F401  (loads SciPy's BLAS)
        from threadpoolctl import ThreadpoolController
        for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
            if "scipy" not in os.path.basename(os.path.dirname(lib.filepath)):
                continue   # numpy's own OpenBLAS, not the one we call
            fn = getattr(lib.dynlib, "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = ctypes.c_int
                return fn
    except Exception:  # no threadpoolctl, another BLAS, an old OpenBLAS
        pass
    return None


def _give_workers_serial_blas(cy):
    """Hand the cython kernels' worker threads OpenBLAS's thread-local
    setter, so that their BLAS calls stay single-threaded too."""
    fn = _local_threads_setter()
    if fn is not None and hasattr(cy, "set_blas_threads_fn"):
        import ctypes
        cy.set_blas_threads_fn(ctypes.cast(fn, ctypes.c_void_p).value or 0)


class _SerialBlas:
    """Context manager: SciPy's BLAS single-threaded in the calling thread.

    Small per-step GEMMs lose more to waking BLAS threads than they gain
    (and far more when the cores are shared), and inside the cython kernels'
    own threads a threaded BLAS would only oversubscribe the cores.  Uses
    OpenBLAS's thread-local setting, so other threads are unaffected; with
    another BLAS it does nothing.
    """

    def __init__(self):
        self._setter = None
        self._looked = False
        self._local = threading.local()

    def __enter__(self):
        if not self._looked:
            self._setter, self._looked = _local_threads_setter(), True
        if self._setter is not None:
            stack = self._local.__dict__.setdefault("saved", [])
            stack.append(self._setter(1))
        return self

    def __exit__(self, *exc):
        if self._setter is not None:
            self._setter(self._local.saved.pop())
        return False


_serial_blas = _SerialBlas()


# When a second thread pays: measured on 2 cores (fastrnn 0.1, own thread
# team), a team is faster than one thread once one step's recurrent GEMM has
# about 64K multiply-adds (B * G*H * H); below that the threads' meeting
# costs more than the work they share.
PARALLEL_STEP_WORK = 1 << 16


def prime(backend, threads):
    """Before a kernel call on ``threads`` threads: wake the backend's
    sleeping worker threads now (when threads > 1 and the backend has a
    team to wake), so that their wake-up overlaps the call's checks and
    allocations instead of delaying its first step."""
    if threads > 1:
        fn = getattr(_loaded.get(backend), "prime_team", None)
        if fn is not None:
            fn()


def thread_plan(backend, B, G, H):
    """(kernel_threads, blas_context) for one kernel call on B rows, G gate
    blocks and H units: the threads the kernel may use, and the context
    manager the call runs in.

    BLAS always runs single-threaded inside the kernels (the calling thread
    here, the kernels' own threads by themselves): waking BLAS's threads for
    every small per-step GEMM costs more than it brings, and their idle
    threads spin on the cores the kernels' threads need.  The kernels split
    the work between their own threads instead (see csrc/fr_pool.h and
    fastrnn/_numba_kernels.py).
    """
    n = get_num_threads()
    parallel = n > 1 and B * G * H * H >= PARALLEL_STEP_WORK
    return (n if parallel else 1), _serial_blas
