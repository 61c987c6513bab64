"""fastrnn._buffers: the pool ops.py takes its large buffers from.  Memory is
reused only once nothing refers to it; what a caller keeps is never
overwritten."""
import numpy as np
import pytest

from fastrnn import _buffers, ops
from fastrnn._buffers import BufferPool

BIG = (512, 1024)          # 2 MiB of float32: pooled
SMALL = (16, 16)           # 1 KiB: straight from NumPy


def test_arrays_are_aligned_contiguous_and_shaped():
    pool = BufferPool(64 << 20)
    for shape, dt in [(BIG, np.float32), ((3, 700, 129), np.float64),
                      (SMALL, np.float32), ((0, 5), np.float64)]:
        a = pool.empty(shape, dt)
        assert a.shape == shape and a.dtype == dt
        assert a.flags.c_contiguous and a.flags.writeable
        assert a.size == 0 or a.ctypes.data % 64 == 0


def test_free_memory_is_reused_and_live_memory_is_not():
    pool = BufferPool(64 << 20)
    a = pool.empty(BIG, np.float32)
    addr = a.ctypes.data
    b = pool.empty(BIG, np.float32)
    assert b.ctypes.data != addr            # a is alive
    del a
    c = pool.empty(BIG, np.float32)
    assert c.ctypes.data == addr            # a's memory, now free
    view = c[3:5]                           # a view keeps it alive
    del c
    d = pool.empty(BIG, np.float32)
    assert d.ctypes.data != addr
    assert view.base is not None
    assert pool.held_bytes() >= 3 * np.prod(BIG) * 4


def test_a_much_larger_free_buffer_is_not_used_for_a_small_request():
    pool = BufferPool(256 << 20)
    a = pool.empty((4096, 4096), np.float32)     # 64 MiB
    addr = a.ctypes.data
    del a
    b = pool.empty(BIG, np.float32)              # 2 MiB
    assert b.ctypes.data != addr


def test_limit_drops_free_buffers_first_and_release_empties():
    pool = BufferPool(5 << 20)                   # room for two 2 MiB buffers
    keep = pool.empty(BIG, np.float32)
    tmp = pool.empty(BIG, np.float32)
    del tmp
    third = pool.empty((600, 1024), np.float32)  # over the limit: drop tmp's
    assert pool.held_bytes() <= 5 << 20
    keep[...] = 1.0
    third[...] = 2.0
    assert np.all(keep == 1.0)
    pool.release()
    assert pool.held_bytes() == 0
    assert np.all(keep == 1.0) and np.all(third == 2.0)   # still valid


def test_zero_limit_disables_pooling():
    pool = BufferPool(0)
    a = pool.empty(BIG, np.float32)
    assert pool.held_bytes() == 0 and a.ctypes.data % 64 == 0


@pytest.mark.parametrize("value, expected", [("0", 0), ("1.5", 3 << 19),
                                             ("64", 64 << 20)])
def test_limit_from_environment(value, expected, monkeypatch):
    monkeypatch.setenv("FASTRNN_BUFFER_POOL_MB", value)
    assert BufferPool()._limit == expected


def test_bad_limit_in_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTRNN_BUFFER_POOL_MB", "lots")
    with pytest.raises(ValueError, match="FASTRNN_BUFFER_POOL_MB.*'lots'"):
        BufferPool()


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_results_kept_by_the_caller_survive_later_calls(backend, kind, rng, kernels):
    """Outputs, states, workspaces and gradients of one call are not
    touched by later calls of the same shapes (which reuse freed memory)."""
    p = kernels.make_problem(rng, kind, 16, 40, 24, 64, np.float32, mask="random")
    q = kernels.make_problem(rng, kind, 16, 40, 24, 64, np.float32)
    first = kernels.run_ops(p, backend)
    snapshot = {k: np.array(v, copy=True) for k, v in first.items()}
    fwd = ops.lstm_forward if kind == "lstm" else ops.rnn_forward
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"])
    if kind == "lstm":
        args += (p["c0"],)
    ws = fwd(*args, mask=p["mask"], return_workspace=True, backend=backend).workspace
    for _ in range(3):
        kernels.run_ops(q, backend)
    for k, v in first.items():
        np.testing.assert_array_equal(v, snapshot[k], err_msg=k)
    bwd = ops.lstm_backward if kind == "lstm" else ops.rnn_backward
    ds = (p["d_outputs"], p["d_h"]) + ((p["d_c"],) if kind == "lstm" else ())
    g = bwd(ws, *ds)
    np.testing.assert_array_equal(g.x, snapshot["d_x"])
    np.testing.assert_array_equal(g.recurrent_kernel, snapshot["d_recurrent_kernel"])


def test_release_buffers_is_public():
    ops.release_buffers()
    assert _buffers.pool.held_bytes() == 0
