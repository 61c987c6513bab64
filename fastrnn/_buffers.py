"""Reusable, 64-byte-aligned scratch and result buffers for fastrnn.ops.

A forward pass with its workspace allocates several megabytes (states,
gates, the time-major input) and the backward pass as much again.  Fresh
large allocations come from the operating system as untouched pages, and
the first write to each page faults: on the machines this was measured on,
the faults cost more than the LSTM arithmetic itself (an LSTM
32x100x64x128 forward with workspace: 10.6 ms fresh, 3.6 ms on reused
memory).  So ops.py takes its large buffers from this pool, which keeps
the memory of buffers nobody uses any more and hands it out again.

A buffer is free when no array refers to it any more: every array handed
out is a view whose ``base`` is the pool's raw buffer, so the raw buffer's
reference count says whether a view (a workspace, an output a caller
kept, a TensorFlow tensor wrapping it) is still alive.  Buffers in use are
never reused.  The pool keeps at most ``FASTRNN_BUFFER_POOL_MB`` MiB
(default 512) of raw buffers, dropping the least recently used free ones
first; ``release()`` empties it.  Small buffers (under 128 KiB) come from
NumPy directly: the C allocator already reuses those.
"""
import math
import os
import sys
import threading

import numpy as np

ALIGN = 64
MIN_POOLED_BYTES = 128 << 10


def _limit_bytes():
    value = os.environ.get("FASTRNN_BUFFER_POOL_MB", "512")
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"FASTRNN_BUFFER_POOL_MB must be a number of MiB, "
                         f"got {value!r}") from None
    return max(0, int(mb * (1 << 20)))


class BufferPool:
    """Aligned arrays carved from reusable raw buffers (see module doc)."""

    def __init__(self, limit_bytes=None):
        self._limit = _limit_bytes() if limit_bytes is None else limit_bytes
        self._lock = threading.Lock()
        self._raws = []          # least recently handed out first

    # sys.getrefcount(raw) of a free buffer while _take scans the list: the
    # list's reference, the loop variable's and getrefcount's argument.
    _FREE_REFS = 3

    def empty(self, shape, dtype):
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``
        whose data starts on a 64-byte boundary."""
        dtype = np.dtype(dtype)
        n = int(math.prod(shape)) * dtype.itemsize
        if n < MIN_POOLED_BYTES or self._limit <= 0:
            raw = np.empty(n + ALIGN, np.uint8)
            return _carve(raw, n, shape, dtype)
        with self._lock:
            raw = self._take(n)
            if raw is None:
                raw = np.empty(n + ALIGN, np.uint8)
                self._raws.append(raw)
                self._trim()
            return _carve(raw, n, shape, dtype)

    def copy(self, a):
        """A pooled C-contiguous copy of the array ``a``."""
        out = self.empty(a.shape, a.dtype)
        np.copyto(out, a)
        return out

    def _take(self, n):
        """The smallest free buffer holding n bytes, at most twice the size
        needed, moved to the recently-used end; None if there is none."""
        best, best_i = None, -1
        for i in range(len(self._raws)):   # not enumerate: its cached tuple
            raw = self._raws[i]            # would hold one more reference
            size = raw.nbytes
            if (n + ALIGN <= size <= 2 * (n + ALIGN)
                    and (best is None or size < best.nbytes)
                    and sys.getrefcount(raw) <= self._FREE_REFS):
                best, best_i = raw, i
        raw = None
        if best is not None:
            del self._raws[best_i]
            self._raws.append(best)
        return best

    def _trim(self):
        """Forget raw buffers, least recently used first (free ones before
        ones still in use, which are freed when their last view goes), until
        the pool holds at most its limit."""
        total = sum(r.nbytes for r in self._raws)
        for only_free in (True, False):
            i = 0
            while total > self._limit and i < len(self._raws):
                raw = self._raws[i]
                if only_free and sys.getrefcount(raw) > self._FREE_REFS:
                    i += 1
                    continue
                total -= raw.nbytes
                del self._raws[i]
            raw = None

    def held_bytes(self):
        """Bytes of raw buffers the pool holds (free or in use)."""
        with self._lock:
            return sum(r.nbytes for r in self._raws)

    def release(self):
        """Forget every buffer; memory still in use is freed with its last
        view."""
        with self._lock:
            self._raws.clear()


def _carve(raw, n, shape, dtype):
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


pool = BufferPool()
