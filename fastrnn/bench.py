"""``fastrnn bench``: fastrnn against stock Keras (and PyTorch) on the issue-4 grid.

Every contender runs one pass of one (layer, shape): ``"fwd"`` (forward) or
``"fwd+bwd"`` (forward, then the gradients of ``sum(outputs)`` with respect to
the inputs and every weight), float32, ``return_sequences=True``:

* ``keras``          stock ``keras.layers.LSTM``/``SimpleRNN`` inside ``tf.function``;
* ``fastrnn.keras``  fastrnn's drop-in layers, same weights, inside ``tf.function``;
* ``ops[<backend>]`` ``fastrnn.ops`` on NumPy arrays, one row per backend;
* ``torch``          ``torch.nn.LSTM``/``nn.RNN`` (forward under ``no_grad``), when
                     ``import torch`` works.

Contenders of one (layer, shape, pass) are timed in one process, alternating
(A, B, C, A, B, C, ...), and reported as medians, GFLOP/s, the fraction of the
NumPy float32 sgemm rate measured at the start of the same run, and speed-ups
over stock Keras.  The peak extra memory of one training step is measured per
layer contender in a fresh subprocess (see bench/README.md for the method).

The grid, the contenders and the runners are importable: the pytest-benchmark
suite in bench/ uses them too.
"""
import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import namedtuple

import numpy as np

import fastrnn
from fastrnn import _backend, ops

__all__ = ["Case", "GRID", "QUICK_GRID", "PASSES", "KERAS_ANCHORS_MS",
           "ContenderUnavailable", "parse_shapes", "flops", "group_name",
           "make_data", "build_runner", "sgemm_gflops", "main"]



class Case(namedtuple("Case", "layer B T I H")):
    """One benchmark shape: layer "lstm" or "rnn", x (B, T, I), H units."""
    __slots__ = ()

    def __str__(self):
        return f"{self.layer}-{self.B}x{self.T}x{self.I}x{self.H}"

    @property
    def spec(self):
        """The ``--shapes`` item naming this case, e.g. ``lstm:32x100x64x128``."""
        return f"{self.layer}:{self.B}x{self.T}x{self.I}x{self.H}"


LAYERS = ("lstm", "rnn")
GATES = {"lstm": 4, "rnn": 1}
PASSES = ("fwd", "fwd+bwd")

GRID = (
    Case("lstm", 1, 100, 128, 256),
    Case("lstm", 32, 100, 64, 128),
    Case("lstm", 64, 50, 256, 256),
    Case("lstm", 16, 100, 128, 512),
    Case("lstm", 128, 20, 32, 64),
    Case("rnn", 1, 100, 128, 256),
    Case("rnn", 32, 100, 64, 128),
)
QUICK_GRID = (Case("lstm", 32, 100, 64, 128), Case("rnn", 32, 100, 64, 128))

# Stock Keras (tf.function, float32) measured when issue 4 was written, in ms:
# (forward, forward+backward).  Printed next to this run's own Keras median.
KERAS_ANCHORS_MS = {
    GRID[0]: (8.3, 45.0), GRID[1]: (13.2, 26.9), GRID[2]: (30.5, 86.1),
    GRID[3]: (81.0, 255.9), GRID[4]: (4.9, 6.9),
    GRID[5]: (3.6, 10.6), GRID[6]: (6.4, 13.3),
}

LAYER_CONTENDERS = ("keras", "fastrnn.keras", "torch")
# The memory subprocesses' environment: glibc serves every block of 4 KiB or
# more with its own mmap and unmaps it on free, and TensorFlow allocates
# through malloc rather than its oneDNN memory pool, so that memory freed by
# the warm-up steps cannot hide the measured step's peak (bench/README.md).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "TF_ENABLE_ONEDNN_OPTS": "0",
              "TF_CPP_MIN_LOG_LEVEL": "3"}


class ContenderUnavailable(Exception):
    """A contender cannot run here (an optional package is missing)."""


# ------------------------------------------------------------------ grid ---
def parse_shapes(spec):
    """``"lstm:32x100x64x128,rnn:1x100x128x256"`` -> tuple of ``Case``.

    Each item is ``LAYER:BxTxIxH`` with LAYER ``lstm`` or ``rnn`` (``simplernn``
    is accepted too) and four positive integers.
    """
    cases = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        layer, _, dims = item.partition(":")
        layer = {"simplernn": "rnn"}.get(layer.strip().lower(), layer.strip().lower())
        try:
            nums = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            nums = ()
        if layer not in LAYERS or len(nums) != 4 or min(nums) < 1:
            raise ValueError(f"shapes: expected items LAYER:BxTxIxH with LAYER "
                             f"in {LAYERS} and four positive integers, got {item!r}")
        cases.append(Case(layer, *nums))
    if not cases:
        raise ValueError(f"shapes: no shape given in {spec!r}")
    return tuple(cases)


def flops(case, pass_):
    """Floating-point operations of one pass: the matrix products only.

    Forward: ``2*B*(I+H)*G*H`` per step, times T (G = 4 for the LSTM, 1 for
    the RNN); forward+backward counts 3x that (the backward pass does two
    products of the forward's size: the input and the weight gradients).
    """
    forward = 2 * case.B * (case.I + case.H) * GATES[case.layer] * case.H * case.T
    return forward if pass_ == "fwd" else 3 * forward


def group_name(case, pass_):
    """The name of a side-by-side comparison, e.g. ``lstm-32x100x64x128-fwd``."""
    return f"{case}-{pass_}"


# ----------------------------------------------------------------- data ----
Data = namedtuple("Data", "x kernel recurrent_kernel bias d_outputs")


def make_data(case, seed=0):
    """float32 inputs x (B, T, I), Keras-layout weights and d_outputs = ones
    (B, T, H), the gradient of ``sum(outputs)``."""
    rng = np.random.default_rng(seed)
    G, H, I = GATES[case.layer], case.H, case.I
    scale = 1.0 / np.sqrt(I + H)

    def uniform(*shape):
        return rng.uniform(-scale, scale, shape).astype(np.float32)

    return Data(rng.standard_normal((case.B, case.T, I)).astype(np.float32),
                uniform(I, G * H), uniform(H, G * H), uniform(G * H),
                np.ones((case.B, case.T, H), np.float32))


# ------------------------------------------------------------- runners -----
def build_runner(name, case, pass_, data=None):
    """A zero-argument callable running one pass of contender ``name``.

    ``name`` is ``"keras"``, ``"fastrnn.keras"``, ``"torch"`` or
    ``"ops[<backend>]"``.  A ``"fwd"`` runner returns the outputs (B, T, H)
    as an array-like.  Raises ``ContenderUnavailable`` when the contender
    cannot run here.
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    data = make_data(case) if data is None else data
    if name.startswith("ops[") and name.endswith("]"):
        return _ops_runner(name[4:-1], case, pass_, data)
    if name == "keras":
        return _keras_runner(_stock_layer_class(case.layer), case, pass_, data)
    if name == "fastrnn.keras":
        return _keras_runner(_fastrnn_layer_class(case.layer), case, pass_, data)
    if name == "torch":
        return _torch_runner(case, pass_, data)
    raise ValueError(f"unknown contender {name!r}: expected one of "
                     f"{LAYER_CONTENDERS} or 'ops[<backend>]'")


def _ops_runner(backend, case, pass_, d):
    if backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of "
                         f"{_backend.BACKENDS}")
    if backend not in fastrnn.available_backends():
        raise ContenderUnavailable(f"backend {backend!r} is not available here "
                                   f"(available: {fastrnn.available_backends()})")
    forward, backward = ((ops.lstm_forward, ops.lstm_backward)
                         if case.layer == "lstm" else
                         (ops.rnn_forward, ops.rnn_backward))
    args = (d.x, d.kernel, d.recurrent_kernel, d.bias)
    if pass_ == "fwd":
        return lambda: forward(*args, backend=backend).outputs

    def step():
        r = forward(*args, return_workspace=True, backend=backend)
        return backward(r.workspace, d.d_outputs)
    return step


def _tf_and_keras():
    try:
        import tensorflow as tf
        import keras
    except ImportError as exc:
        raise ContenderUnavailable(f"TensorFlow/Keras is not importable ({exc}); "
                                   f"pip install 'fastrnn[tensorflow]'") from None
    if keras.backend.backend() != "tensorflow":
        raise ContenderUnavailable(f"the Keras contenders need KERAS_BACKEND="
                                   f"tensorflow, not {keras.backend.backend()!r}")
    return tf, keras


def _stock_layer_class(layer):
    _, keras = _tf_and_keras()
    return keras.layers.LSTM if layer == "lstm" else keras.layers.SimpleRNN


def _fastrnn_layer_class(layer):
    _tf_and_keras()
    try:
        from fastrnn.keras import LSTM, SimpleRNN
    except ImportError as exc:
        raise ContenderUnavailable(f"fastrnn.keras is not importable: {exc}") from None
    return LSTM if layer == "lstm" else SimpleRNN


def _keras_runner(layer_class, case, pass_, d):
    tf, _ = _tf_and_keras()
    layer = layer_class(case.H, return_sequences=True)
    layer.build((case.B, case.T, case.I))
    layer.set_weights([d.kernel, d.recurrent_kernel, d.bias])
    x = tf.constant(d.x)
    if pass_ == "fwd":
        fn = tf.function(lambda x: layer(x))
        return lambda: fn(x)
    weights = list(layer.trainable_variables)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, [x] + weights)
    return lambda: step(x)


def _torch():
    try:
        import torch
    except ImportError:
        raise ContenderUnavailable("PyTorch is not installed (optional)") from None
    return torch


def _torch_runner(case, pass_, d):
    torch = _torch()
    if case.layer == "lstm":
        module = torch.nn.LSTM(case.I, case.H, batch_first=True)
    else:
        module = torch.nn.RNN(case.I, case.H, nonlinearity="tanh", batch_first=True)
    with torch.no_grad():       # torch: (G*H, I) weights, gate order i, f, g, o
        module.weight_ih_l0.copy_(torch.from_numpy(d.kernel.T.copy()))
        module.weight_hh_l0.copy_(torch.from_numpy(d.recurrent_kernel.T.copy()))
        module.bias_ih_l0.copy_(torch.from_numpy(d.bias))
        module.bias_hh_l0.zero_()
    x = torch.from_numpy(d.x)
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return module(x)[0]
        return forward
    x = x.clone().requires_grad_(True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x)[0].sum().backward()
        return x.grad
    return step


# ------------------------------------------------------------ measuring ----
def sgemm_gflops(n=1024, repeats=5):
    """NumPy float32 (n, n) @ (n, n) rate in GFLOP/s: the best of
    ``repeats`` timed products after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def _one_blas_thread():
    """Context: NumPy's (and SciPy's) BLAS on one thread, where threadpoolctl
    is installed."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(1, user_api="blas")
    except ImportError:
        return contextlib.nullcontext()


def _let_blas_threads_idle(seconds=0.3):
    """After a threaded NumPy product, OpenBLAS's workers busy-wait for about
    0.1 s before sleeping; wait that out before timing anything."""
    time.sleep(seconds)


def time_alternating(runners, repeats, warmup=2, settle=1):
    """Time ``runners`` (name -> callable) side by side.

    Each runs ``warmup`` times (tracing, JIT compilation, first-touch), then
    ``repeats`` rounds call every runner in turn, the order rotating by one
    each round.  In a round, each runner first runs ``settle`` untimed
    times, then once timed: a library's idle threads keep spinning for a
    while after its call (OpenMP's, OpenBLAS's, TensorFlow's), and the
    untimed call takes that tail instead of the next contender's timed run.
    Returns name -> list of seconds.
    """
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times = {name: [] for name in names}
    for r in range(repeats if names else 0):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for _ in range(settle):
                runners[name]()
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _memory_child(argv):
    """Subprocess entry: measure one training step of contender argv[0] on
    shape argv[1] (see ``measure_memory``); print the result as a JSON line."""
    name, spec, threads = argv
    if int(threads):
        _set_threads(int(threads), keras=name in ("keras", "fastrnn.keras"))
    case, = parse_shapes(spec)
    step = build_runner(name, case, "fwd+bwd")
    step()
    step()
    from . import _buffers

    def fresh():
        # fastrnn keeps its large buffers for reuse between calls; let them
        # go, so that the measured step allocates its whole working set, as
        # it would without that pool (what the pool keeps between steps is
        # reported separately)
        _buffers.pool.release()
        gc.collect()
    fresh()
    with open("/proc/self/clear_refs", "w") as f:    # resets VmHWM to VmRSS
        f.write("5")
    before = _vm_kib("VmRSS")
    step()
    rss = (_vm_kib("VmHWM") - before) * 1024
    held = _buffers.pool.held_bytes()
    fresh()
    tracemalloc.start()
    step()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"peak_extra_bytes": rss, "traced_extra_bytes": traced,
                      "pool_bytes": held}))


def measure_memory(name, case, threads=0, timeout=600):
    """Peak extra memory of one training step (forward+backward) of
    contender ``name``, measured in a fresh subprocess (environment
    ``MEMORY_ENV``) after two warm-up steps.  Returns a dict:

    * ``peak_extra_bytes``: growth of the peak resident set over one step;
    * ``traced_extra_bytes``: tracemalloc's peak over the next step (NumPy
      buffers and Python objects only: a cross-check for NumPy-side memory);
    * ``pool_bytes``: what fastrnn's buffer pool keeps between steps (0 for
      the other contenders).  Both steps start with the pool emptied, so the
      peaks count fastrnn's whole working set;
    * ``error``: None, or why there are no numbers (which are then None).
    """
    out = {"peak_extra_bytes": None, "traced_extra_bytes": None, "pool_bytes": None}
    if not os.path.exists("/proc/self/clear_refs"):
        return dict(out, error="needs Linux's /proc/self/clear_refs")
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    env = dict(os.environ, **MEMORY_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = "import sys; from fastrnn.bench import _memory_child; _memory_child(sys.argv[1:])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, name, case.spec, str(threads)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(out, error=f"timed out after {timeout} s")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(out, error=f"subprocess failed: {last}")
    return dict(out, **json.loads(proc.stdout.strip().splitlines()[-1]), error=None)


# ------------------------------------------------------------- the run -----
class Progress:
    """A one-line progress indicator on stderr (rewritten in place on a
    terminal, one line per step otherwise)."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = enabled and sys.stderr.isatty()

    def step(self, label):
        self.done += 1
        if not self.enabled:
            return
        width = 20
        filled = width * (self.done - 1) // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        sys.stderr.write(f"\r\033[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _set_threads(n, keras=True):
    """Use ``n`` threads in fastrnn, TensorFlow (when ``keras``; it must not
    have run yet in this process) and PyTorch (when installed)."""
    fastrnn.set_num_threads(n)
    if keras:
        try:
            tf, _ = _tf_and_keras()
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except (ContenderUnavailable, RuntimeError):
            pass   # RuntimeError: TensorFlow already initialised in this process
    try:
        _torch().set_num_threads(n)
    except ContenderUnavailable:
        pass


def _contenders(args):
    # The NumPy reference is not a speed contender (and its threaded BLAS's
    # idle threads would spin into the others' runs): only when asked for.
    backends = args.backend or [b for b in fastrnn.available_backends()
                                if b != "numpy"]
    names = [] if args.no_keras else ["keras", "fastrnn.keras"]
    names += [f"ops[{b}]" for b in dict.fromkeys(backends)]
    if not args.no_torch:
        names.append("torch")
    return names


# Environment variables that change what is measured (thread counts, which
# kernels OpenBLAS runs, fastrnn's own knobs): recorded in the report.
ENVIRONMENT = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OPENBLAS_L2_SIZE",
               "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
               "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
               "FASTRNN_BACKEND", "FASTRNN_SPLIT", "FASTRNN_BUFFER_POOL_MB")


def _environment():
    return {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}


def _team_stats():
    """The compiled backends' thread-team counters (each module's
    ``team_stats()``: cython's team, csrc/fr_pool.h; numba's unit split)."""
    out = {}
    for name in ("cython", "numba"):
        if name in fastrnn.available_backends():
            stats = getattr(_backend.module(name), "team_stats", None)
            if stats is not None:
                out[name] = stats()
    return out


def _versions():
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "fastrnn": fastrnn.__version__}
    for mod in ("tensorflow", "keras", "torch", "numba"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def _probe(name, unavailable):
    """Whether contender ``name`` can run here; records why not in ``unavailable``."""
    check = {"keras": lambda: _stock_layer_class("lstm"),
             "fastrnn.keras": lambda: _fastrnn_layer_class("lstm"),
             "torch": _torch}.get(name)
    try:
        if check is not None:
            check()
        elif name[4:-1] not in fastrnn.available_backends():
            raise ContenderUnavailable(f"backend {name[4:-1]!r} is not available here")
    except ContenderUnavailable as exc:
        unavailable[name] = str(exc)
        return False
    return True


def run(cases, contenders, repeats, memory=True, threads=0, progress=True):
    """Benchmark ``cases`` x PASSES x ``contenders``; returns the report dict
    (the structure written by ``--json``)."""
    load = [os.getloadavg()[0]]
    teams = _team_stats()
    peaks = [sgemm_gflops()]
    _let_blas_threads_idle()
    report = {"fastrnn": fastrnn.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "fastrnn_threads": fastrnn.get_num_threads(),
              "available_backends": list(fastrnn.available_backends()),
              "repeats": repeats, "dtype": "float32",
              "groups": [], "memory": [], "unavailable": {}, "failed": {}}
    contenders = [n for n in contenders if _probe(n, report["unavailable"])]
    mem_names = [n for n in contenders if n in LAYER_CONTENDERS] if memory else []
    bar = Progress(len(cases) * (len(PASSES) + len(mem_names)), progress)
    for case in cases:
        data = make_data(case)
        with _one_blas_thread():   # no BLAS threads left spinning into the timings
            reference = np.asarray(build_runner("ops[numpy]", case, "fwd", data)())
        for pass_ in PASSES:
            bar.step(group_name(case, pass_))
            report["groups"].append(_measure_group(case, pass_, contenders, data,
                                                   reference, repeats, report))
        timed = {r["contender"] for g in report["groups"][-len(PASSES):] for r in g["rows"]}
        for name in mem_names:
            bar.step(f"{case} memory: {name}")
            if name not in timed:
                continue
            report["memory"].append({"case": str(case), "contender": name,
                                     **measure_memory(name, case, threads)})
    bar.close()
    peaks.append(sgemm_gflops())
    load.append(os.getloadavg()[0])
    report.update(sgemm_gflops=max(peaks), sgemm_gflops_start_end=peaks,
                  loadavg_start_end=load, versions=_versions(),
                  environment=_environment(),
                  teams={name: {k: v - teams[name].get(k, 0) for k, v in now.items()}
                         for name, now in _team_stats().items()})
    for g in report["groups"]:
        for r in g["rows"]:
            r["peak_fraction"] = r["gflops"] / report["sgemm_gflops"]
    return report


def _measure_group(case, pass_, contenders, data, reference, repeats, report):
    """Build, check and time ``contenders`` on one (case, pass); a contender
    that raises is left out and recorded in ``report["failed"]``."""
    runners, errors = {}, {}
    for name in contenders:
        try:
            fn = build_runner(name, case, pass_, data)
            result = fn()                       # the first, untimed run
            if pass_ == "fwd":
                errors[name] = float(np.max(np.abs(np.asarray(result) - reference)))
            runners[name] = fn
        except ContenderUnavailable as exc:
            report["unavailable"].setdefault(name, str(exc))
        except Exception as exc:
            report["failed"][f"{name} {group_name(case, pass_)}"] = \
                f"{type(exc).__name__}: {exc}"
    times = time_alternating(runners, repeats, warmup=1)
    return _group(case, pass_, times, errors)


def _group(case, pass_, times, errors):
    """The report's entry for one (case, pass); ``peak_fraction`` is filled
    in by ``run`` once the sgemm rate is known."""
    gflop = flops(case, pass_) / 1e9
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"contender": name, "median_ms": med * 1e3,
                     "times_ms": [t * 1e3 for t in ts], "gflops": gflop / med,
                     "peak_fraction": None, "max_abs_err": errors.get(name)})
    base = next((r for r in rows if r["contender"] == "keras"), None)
    for r in rows:
        r["speedup"] = base["median_ms"] / r["median_ms"] if base else None
    anchor = KERAS_ANCHORS_MS.get(case)
    return {"name": group_name(case, pass_), "case": str(case), "layer": case.layer,
            "B": case.B, "T": case.T, "I": case.I, "H": case.H, "pass": pass_, "gflop": gflop,
            "keras_anchor_ms": anchor[PASSES.index(pass_)] if anchor else None,
            "rows": rows}


# ------------------------------------------------------------- output ------
LAYER_TITLES = {"lstm": "LSTM", "rnn": "SimpleRNN"}


def format_report(report):
    """The report as text tables, one per (layer, shape, pass)."""
    lines = [f"fastrnn {report['fastrnn']} bench: float32, median of "
             f"{report['repeats']} alternating runs; fastrnn threads "
             f"{report['fastrnn_threads']}; backends {report['available_backends']}",
             f"NumPy sgemm 1024^3 peak: {report['sgemm_gflops']:.1f} GFLOP/s (best of "
             f"5, at start and end: {report['sgemm_gflops_start_end'][0]:.1f}, "
             f"{report['sgemm_gflops_start_end'][1]:.1f})",
             f"load average at start and end: {report['loadavg_start_end'][0]:.2f}, "
             f"{report['loadavg_start_end'][1]:.2f} on {report['cpus']} CPUs"
             + ("  (a busy machine: timings are noisy)"
                if max(report["loadavg_start_end"]) > 0.5 * (report["cpus"] or 1) else "")]
    env = report.get("environment") or {}
    if env:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env.items())
                     + ("  (OPENBLAS_CORETYPE forces OpenBLAS's kernels for that CPU type:"
                        " BLAS, and the sgemm peak, may run slower than this CPU can)"
                        if "OPENBLAS_CORETYPE" in env else ""))
    lines.append("")
    for g in report["groups"]:
        anchor = (f"; Keras anchor {g['keras_anchor_ms']} ms"
                  if g["keras_anchor_ms"] is not None else "")
        lines.append(f"{LAYER_TITLES[g['layer']]} B={g['B']} T={g['T']} I={g['I']} "
                     f"H={g['H']}  {'forward' if g['pass'] == 'fwd' else 'forward+backward'}"
                     f"  ({g['gflop']:.3g} GFLOP{anchor})")
        lines.append(f"  {'contender':<15}{'median ms':>11}{'GFLOP/s':>10}"
                     f"{'% peak':>9}{'speed-up':>10}{'max|err|':>10}")
        for r in g["rows"]:
            speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
            err = f"{r['max_abs_err']:.1e}" if r["max_abs_err"] is not None else "-"
            lines.append(f"  {r['contender']:<15}{r['median_ms']:>11.3f}"
                         f"{r['gflops']:>10.2f}{100 * r['peak_fraction']:>8.1f}%"
                         f"{speed:>10}{err:>10}")
        lines.append("")
    if report["memory"]:
        lines.append("Peak extra resident memory of one training step (fwd+bwd), MiB "
                     "(traced: NumPy/Python allocations, tracemalloc; kept: "
                     "what fastrnn's buffer pool keeps for the next step):")
        for m in report["memory"]:
            if m["error"] is not None:
                val = f"n/a ({m['error']})"
            else:
                val = (f"{m['peak_extra_bytes'] / 2 ** 20:8.1f}   traced "
                       f"{m['traced_extra_bytes'] / 2 ** 20:6.1f}   kept "
                       f"{m['pool_bytes'] / 2 ** 20:6.1f}")
            lines.append(f"  {m['case']:<22}{m['contender']:<15}{val}")
        lines.append("")
    summary = _speedup_summary(report)
    if summary:
        lines.append("Speed-up of fastrnn.keras over stock Keras:")
        lines += [f"  {case:<22}fwd {fwd:>6}   fwd+bwd {bwd:>6}" for case, fwd, bwd in summary]
        lines.append("")
    teams = report.get("teams") or {}
    if teams:
        lines.append("Kernel thread teams during the run (calls on several threads, those that "
                     "stalled: a thread of the team not running, and calls run on one thread "
                     "while backing off after stalls):")
        for name, t in teams.items():
            lines.append(f"  {name:<8}{t['team_calls']:>7} team calls, {t['stalled_calls']} "
                         f"stalled, {t['backoff_calls']} backed off")
        lines.append("")
    for name, why in report["unavailable"].items():
        lines.append(f"skipped {name}: {why}")
    for key, why in report["failed"].items():
        lines.append(f"FAILED {key}: {why}")
    return "\n".join(lines)


def _speedup_summary(report):
    table = {}
    for g in report["groups"]:
        for r in g["rows"]:
            if r["contender"] == "fastrnn.keras" and r["speedup"] is not None:
                table.setdefault(g["case"], {})[g["pass"]] = f"{r['speedup']:.2f}x"
    return [(c, v.get("fwd", "-"), v.get("fwd+bwd", "-")) for c, v in table.items()]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("fastrnn bench: --plot needs matplotlib: "
                         "pip install 'fastrnn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_speedups(report, path):
    """Bar chart of every contender's speed-up over stock Keras, per shape,
    one panel per pass, saved to ``path``."""
    plt = _require_matplotlib()
    fig, axes = plt.subplots(len(PASSES), 1, figsize=(11, 4 * len(PASSES)), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], PASSES):
        groups = [g for g in report["groups"] if g["pass"] == pass_]
        names = list(dict.fromkeys(r["contender"] for g in groups for r in g["rows"]
                                   if r["contender"] != "keras" and r["speedup"] is not None))
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            xs, ys = [], []
            for i, g in enumerate(groups):
                for r in g["rows"]:
                    if r["contender"] == name:
                        xs.append(i + (k - (len(names) - 1) / 2) * width)
                        ys.append(r["speedup"])
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1.0, label=name)  # from parity
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.margins(y=0.1)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g["case"] for g in groups], rotation=15)
        ax.set_ylabel("speed-up over stock Keras (log)")
        ax.set_title("forward" if pass_ == "fwd" else "forward+backward")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- CLI ------
def build_parser():
    p = argparse.ArgumentParser(
        prog="fastrnn bench",
        description="Time fastrnn (fastrnn.keras layers and fastrnn.ops per backend) "
                    "against stock Keras and PyTorch, side by side, on the issue-4 grid.")
    p.add_argument("--quick", action="store_true",
                   help=f"5 repeats on {len(QUICK_GRID)} shapes of the grid "
                        f"(unless --repeats/--shapes say otherwise)")
    p.add_argument("--shapes", metavar="SPEC",
                   help="comma-separated LAYER:BxTxIxH items to run instead of the "
                        "grid, e.g. lstm:32x100x64x128,rnn:2x5x8x8")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed runs per contender (default 15, 5 with --quick)")
    p.add_argument("--backend", action="append", choices=_backend.BACKENDS,
                   help="fastrnn.ops backend to time (repeatable; default: every "
                        "available compiled one).  The fastrnn.keras layers use "
                        "FASTRNN_BACKEND/auto.")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads for fastrnn, TensorFlow and PyTorch (default: each "
                        "library's own default)")
    p.add_argument("--no-keras", action="store_true",
                   help="skip the Keras contenders (no TensorFlow import)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the per-contender training-step memory measurement")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--plot", metavar="PATH.png",
                   help="save speed-up bars per shape (needs matplotlib: fastrnn[plot])")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def main(argv=None):
    """Entry point of ``fastrnn bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cases = parse_shapes(args.shapes) if args.shapes else (
            QUICK_GRID if args.quick else GRID)
    except ValueError as exc:
        parser.error(str(exc))
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    if repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    for b in args.backend or ():
        if b not in fastrnn.available_backends():
            parser.error(f"--backend {b}: not available here "
                         f"(available: {fastrnn.available_backends()})")
    if args.plot:
        _require_matplotlib()
    if args.threads:
        _set_threads(args.threads, keras=not args.no_keras)
    report = run(cases, _contenders(args), repeats, memory=not args.no_memory,
                 threads=args.threads, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot_speedups(report, args.plot)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
