"""The Numba backend's float32 recurrent product on packed weights.

Each time step multiplies a few rows (the batch) by the same weights.  A
BLAS GEMM packs its operands again on every call, which for one step's
small product is as much memory traffic as the product itself (and at
batch 1 a GEMV cannot use the same weights twice).  As in the C kernels
(``csrc/rnn_kernels.c``), the weights are packed once per call, in panels
of ``NR`` = 32 columns, each ``K x NR`` contiguous and zero-padded, and a
register-blocked tile multiplies them: ``R`` rows by 32 columns, the
accumulators held in LLVM vector registers (``<16 x float>``, which LLVM
lowers to AVX-512, AVX2 or SSE as the CPU has), emitted through a Numba
``@intrinsic`` because Numba's loops over arrays keep accumulators in
memory.  Tiles of 8 rows (16 accumulators), then 4, 2 and 1 for the rest;
the narrow ones take several k steps at once into separate accumulators,
so that the multiply-add latency is covered at batch 1.

float64 keeps BLAS on the weights as they are (as the C kernels do):
``pack_columns``/``pack_rows_t`` return plain matrices for it, and
``product`` dispatches on the packed operand's shape at compile time.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

NR = 32          # columns per panel: two vectors of 16 floats
_VW = 16         # floats per vector
_JIT = dict(nogil=True, cache=True, error_model="numpy")

# rows per tile -> k steps at once (R * 2 * KU accumulators)
_TILES = {8: 1, 4: 2, 2: 4, 1: 4}


def _k_loop(fn, b, name, k0, k1, step, accs0, body):
    """Emit, after builder b's block in fn, a loop for k = k0, k0 + step, ...
    while k < k1 (k1 - k0 a multiple of step; none when k0 >= k1) whose
    body(builder, k, accs) returns the accumulators' new values; returns
    the builder of the block after it and the accumulators' final values."""
    i64 = ir.IntType(64)
    pre = b.block
    loop = fn.append_basic_block(name)
    out = fn.append_basic_block(name + ".done")
    b.cbranch(b.icmp_signed("<", k0, k1), loop, out)
    lb = ir.IRBuilder(loop)
    k = lb.phi(i64)
    k.add_incoming(k0, pre)
    accs = []
    for a0 in accs0:
        ph = lb.phi(a0.type)
        ph.add_incoming(a0, pre)
        accs.append(ph)
    new = body(lb, k, accs)
    k_next = lb.add(k, ir.Constant(i64, step))
    k.add_incoming(k_next, loop)
    for ph, nw in zip(accs, new):
        ph.add_incoming(nw, loop)
    lb.cbranch(lb.icmp_signed("<", k_next, k1), loop, out)
    ob = ir.IRBuilder(out)
    final = []
    for a0, nw in zip(accs0, new):
        ph = ob.phi(a0.type)
        ph.add_incoming(a0, pre)
        ph.add_incoming(nw, loop)
        final.append(ph)
    return ob, final


def _tile_function(module, R, KU, TA=False, ACC=False):
    """The LLVM function C[r, 0:32] = sum_k A[r*lda + k] * P[k*32 + 0:32]
    for r < R: void (float *A, i64 lda, float *P, i64 K, float *C, i64 ldc),
    defined in module once.  TA: A is read transposed, A[k*lda + r] (the
    weight gradients' x^T dz); ACC: C += the sums instead of C = them."""
    name = f"fastrnn_panel_tile_f32_r{R}_u{KU}" + ("_ta" if TA else "") + ("_acc" if ACC else "")
    try:
        return module.get_global(name)
    except KeyError:
        pass
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vec = ir.VectorType(f32, _VW)
    ptr = f32.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ptr, i64, ptr, i64, ptr, i64]),
                     name)
    fn.linkage = "internal"
    A, lda, P, K, C, ldc = fn.args
    try:
        fma = module.get_global("llvm.fmuladd.v16f32")
    except KeyError:
        fma = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fmuladd.v16f32")
    vptr = vec.as_pointer()
    zero_v = ir.Constant(vec, [ir.Constant(f32, 0.0)] * _VW)
    splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), _VW), [0] * _VW)
    nv = NR // _VW

    def c64(v):
        return ir.Constant(i64, v)

    def steps(u_count):
        """A loop body: u_count k-steps, accumulator (r, v, u) for step u."""
        def body(b, k, accs):
            new = list(accs)
            for u in range(u_count):
                ku = b.add(k, c64(u))
                bv = []
                for v in range(nv):   # the panel's row k: nv vectors
                    off = b.add(b.mul(ku, c64(NR)), c64(v * _VW))
                    bv.append(b.load(b.bitcast(b.gep(P, [off], inbounds=True), vptr),
                                     align=4))
                for r in range(R):    # A[r, k] broadcast
                    off = (b.add(b.mul(ku, lda), c64(r)) if TA
                           else b.add(b.mul(c64(r), lda), ku))
                    a = b.load(b.gep(A, [off], inbounds=True), align=4)
                    a = b.insert_element(ir.Constant(vec, ir.Undefined), a,
                                         ir.Constant(ir.IntType(32), 0))
                    a = b.shuffle_vector(a, ir.Constant(vec, ir.Undefined), splat_mask)
                    for v in range(nv):
                        i = (r * nv + v) * u_count + u
                        new[i] = b.call(fma, [a, bv[v], new[i]])
            return new
        return body

    b = ir.IRBuilder(fn.append_basic_block("entry"))
    kmain = b.mul(b.udiv(K, c64(KU)), c64(KU)) if KU > 1 else K
    # KU k-steps at a time into separate accumulators, then their sums ...
    b, part = _k_loop(fn, b, "main", c64(0), kmain, KU, [zero_v] * (R * nv * KU),
                      steps(KU))
    acc = []
    for rv in range(R * nv):
        total = part[rv * KU]
        for u in range(1, KU):
            total = b.fadd(total, part[rv * KU + u])
        acc.append(total)
    # ... and the last K % KU steps one at a time
    b, acc = _k_loop(fn, b, "rest", kmain, K, 1, acc, steps(1))
    for r in range(R):
        for v in range(nv):
            off = b.add(b.mul(c64(r), ldc), c64(v * _VW))
            where = b.bitcast(b.gep(C, [off], inbounds=True), vptr)
            total = acc[r * nv + v]
            if ACC:
                total = b.fadd(b.load(where, align=4), total)
            b.store(total, where, align=4)
    b.ret_void()
    return fn


def _make_tile(R, KU, TA=False, ACC=False):
    @intrinsic
    def tile(typingctx, A, a_off, lda, P, p_off, K, C, c_off, ldc):
        arrays = (A, P, C)
        if not all(isinstance(t, types.Array) and t.dtype == types.float32
                   for t in arrays):
            return None
        sig = types.void(A, types.intp, types.intp, P, types.intp, types.intp,
                         C, types.intp, types.intp)

        def codegen(context, builder, sig, args):
            fn = _tile_function(builder.module, R, KU, TA, ACC)
            ptrs = []
            for ty, val, off in ((sig.args[0], args[0], args[1]),
                                 (sig.args[3], args[3], args[4]),
                                 (sig.args[6], args[6], args[7])):
                data = context.make_array(ty)(context, builder, val).data
                ptrs.append(builder.gep(data, [off], inbounds=True))
            builder.call(fn, [ptrs[0], args[2], ptrs[1], args[5], ptrs[2], args[8]])
            return context.get_dummy_value()
        return sig, codegen
    return tile


_tile8, _tile4, _tile2, _tile1 = (_make_tile(R, _TILES[R]) for R in (8, 4, 2, 1))
# A read transposed (the weight gradients): C = ..., and C += ... (8 rows)
_tile8t, _tile4t, _tile2t, _tile1t = (_make_tile(R, _TILES[R], TA=True)
                                      for R in (8, 4, 2, 1))
_tile8ta = _make_tile(8, _TILES[8], TA=True, ACC=True)


@intrinsic
def _copy(typingctx, dst, dst_off, src, src_off, n):
    """dst[dst_off:dst_off + n] = src[src_off:src_off + n] as one memcpy,
    offsets in elements of two float32 arrays (contiguous from there).
    (Numba's own loops over computed offsets keep a negative-index check
    per element that stops LLVM from vectorising them.)"""
    if not all(isinstance(t, types.Array) and t.dtype == types.float32
               and t.layout == "C" for t in (dst, src)):
        return None
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0]).data
        s_ = context.make_array(sig.args[2])(context, builder, args[2]).data
        d = builder.gep(d, [args[1]], inbounds=True)
        s_ = builder.gep(s_, [args[3]], inbounds=True)
        cgutils.raw_memcpy(builder, d, s_, args[4], 4)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", **_JIT)
def _copy_run(dst, dst_off, src, src_off, n):
    """``_copy``; a whole panel row (n = NR) as a fixed-length copy, which
    LLVM inlines as two vector moves instead of calling memcpy."""
    if n == NR:
        _copy(dst, dst_off, src, src_off, NR)
    else:
        _copy(dst, dst_off, src, src_off, n)


@njit(inline="always", **_JIT)
def _tiles(M, A, a_off, lda, P, po, K, C, c_off, ldc):
    """M rows of C (from c_off, ldc apart) = M rows of A (from a_off, lda
    apart) times the panel at P[po:] (K x NR): tiles of 8, then 4, 2, 1."""
    r = 0
    while r + 8 <= M:
        _tile8(A, a_off + r * lda, lda, P, po, K, C, c_off + r * ldc, ldc)
        r += 8
    if r + 4 <= M:
        _tile4(A, a_off + r * lda, lda, P, po, K, C, c_off + r * ldc, ldc)
        r += 4
    if r + 2 <= M:
        _tile2(A, a_off + r * lda, lda, P, po, K, C, c_off + r * ldc, ldc)
        r += 2
    if r < M:
        _tile1(A, a_off + r * lda, lda, P, po, K, C, c_off + r * ldc, ldc)


@njit(**_JIT)
def _check_panels(P, K):
    assert P.shape[1] == K and P.shape[2] == NR and P.strides[2] == 4
    assert P.strides[1] == NR * 4 and P.strides[0] == K * NR * 4


@njit(**_JIT)
def _panel_product(A, P, C):
    """C[:, :np*NR] = A (M, K) @ the panels P (np, K, NR); A's and C's rows
    are contiguous (any row stride), P contiguous."""
    M, K = A.shape
    npn = P.shape[0]
    if M == 0:
        return
    _check_panels(P, K)
    assert C.shape[0] == M and C.shape[1] >= npn * NR
    assert A.strides[1] == 4 and C.strides[1] == 4
    lda, ldc = A.strides[0] // 4, C.strides[0] // 4
    for p in range(npn):
        _tiles(M, A, 0, lda, P, p * K * NR, K, C, p * NR, ldc)


PROJ_ROWS = 64   # rows of x per block of the input projection (cache-resident)


@njit(**_JIT)
def _project_panels(A, P, G, H, j0, w, Z):
    """The input projection of a thread's columns: Z[:, q*H + j0 + u] =
    (A @ W's packed columns)[:, q*w + u] for the n = G*w columns packed by
    ``pack_columns(W, G, j0, j0 + w)`` into P.  A (M, K) and Z (M, G*H):
    rows contiguous, any row stride (a batch row's run of steps of x, into
    the pre-activations' rows B apart).  Panels inside one gate block's run
    go straight into Z, the others through a small buffer."""
    M, K = A.shape
    n = G * w
    if M == 0 or n == 0:
        return
    if K == 0:   # no input features: x W is zero
        for q in range(G):
            Z[:, q * H + j0:q * H + j0 + w] = 0
        return
    _check_panels(P, K)
    assert A.strides[1] == 4 and Z.strides[1] == 4 and Z.shape[0] == M
    lda, ldz = A.strides[0] // 4, Z.strides[0] // 4
    tmp = np.empty((PROJ_ROWS, NR), np.float32)
    for rb in range(0, M, PROJ_ROWS):
        m = min(PROJ_ROWS, M - rb)
        for p in range(P.shape[0]):
            c0 = p * NR
            q = c0 // w
            u = c0 - q * w
            if u + NR <= w:
                _tiles(m, A, rb * lda, lda, P, p * K * NR, K, Z,
                       rb * ldz + q * H + j0 + u, ldz)
                continue
            _tiles(m, A, rb * lda, lda, P, p * K * NR, K, tmp, 0, NR)
            for c in range(min(NR, n - c0)):
                qq = (c0 + c) // w
                col = qq * H + j0 + c0 + c - qq * w
                for r in range(m):
                    Z[rb + r, col] = tmp[r, c]


TN_KB = 128     # rows of dz packed at a time for the weight gradients


@njit(inline="always", **_JIT)
def _tn_rows(A, a_off, lda, flat, kk, nc, add, C, c0, tmp):
    """Rows of C, columns [c0, c0 + nc) = A.T (A's kk rows from a_off, lda
    apart) @ the packed panel ``flat`` (kk x NR), or += when add: tiles
    that read A transposed; partial panels and the last rows through tmp."""
    M = C.shape[0]
    ldc = C.strides[0] // 4
    m = 0
    if nc == NR:   # whole panels: straight into C
        while m + 8 <= M:
            if add:
                _tile8ta(A, a_off + m, lda, flat, 0, kk, C, m * ldc + c0, ldc)
            else:
                _tile8t(A, a_off + m, lda, flat, 0, kk, C, m * ldc + c0, ldc)
            m += 8
    while m < M:   # the rest through tmp
        r = 8 if M - m >= 8 else 4 if M - m >= 4 else 2 if M - m >= 2 else 1
        if r == 8:
            _tile8t(A, a_off + m, lda, flat, 0, kk, tmp, 0, NR)
        elif r == 4:
            _tile4t(A, a_off + m, lda, flat, 0, kk, tmp, 0, NR)
        elif r == 2:
            _tile2t(A, a_off + m, lda, flat, 0, kk, tmp, 0, NR)
        else:
            _tile1t(A, a_off + m, lda, flat, 0, kk, tmp, 0, NR)
        for i in range(r):
            row = C[m + i]
            if add:
                for c in range(nc):
                    row[c0 + c] += tmp[i, c]
            else:
                for c in range(nc):
                    row[c0 + c] = tmp[i, c]
        m += r


@njit(**_JIT)
def _tn_product2(A1, A2, Bm, b0, C1, C2, s, acc):
    """C1 (M1, n) = A1.T @ Bm[:, b0:b0 + n], C2 (M2, n) = A2.T @ the same
    and s (n) = its column sums, or all three added to when acc: A1 (K,
    M1), A2 (K, M2) (rows contiguous, any row stride), Bm C-contiguous.
    The backward's dW = x^T dz, dU = h^T dz and db for a thread's columns:
    blocks of TN_KB rows of Bm are packed a panel at a time (its columns
    summed on the way), once for both products, and every row of C1 and C2
    multiplied by it (``_tn_rows``)."""
    K, M1 = A1.shape
    M2 = A2.shape[1]
    n = C2.shape[1]
    if n == 0:
        return
    assert (Bm.shape[0] == K and A2.shape[0] == K and C1.shape[0] == M1
            and C2.shape[0] == M2 and C1.shape[1] == n and s.shape[0] == n
            and 0 <= b0 and b0 + n <= Bm.shape[1])
    # (NumPy may give an empty array any strides)
    assert M1 == 0 or (A1.strides[1] == 4 and C1.strides[1] == 4)
    assert M2 == 0 or (A2.strides[1] == 4 and C2.strides[1] == 4)
    if not acc:
        s[:] = 0
    if K == 0:
        if not acc:
            C1[:, :] = 0
            C2[:, :] = 0
        return
    ldb = Bm.shape[1]
    lda1, lda2 = A1.strides[0] // 4, A2.strides[0] // 4
    panel = _empty_panels(1, TN_KB)
    flat = panel.reshape(TN_KB * NR)
    tmp = np.empty((8, NR), np.float32)
    sums = np.empty(NR, np.float32)
    for kb in range(0, K, TN_KB):
        kk = min(TN_KB, K - kb)
        add = acc or kb > 0
        for c0 in range(0, n, NR):
            nc = min(NR, n - c0)
            sums[:] = 0
            for k in range(kk):
                o = (kb + k) * ldb + b0 + c0
                _copy_run(flat, k * NR, Bm, o, nc)
                for c in range(nc):
                    sums[c] += flat[k * NR + c]
                for c in range(nc, NR):
                    flat[k * NR + c] = 0
            for c in range(nc):
                s[c0 + c] += sums[c]
            if M1 > 0:
                _tn_rows(A1, kb * lda1, lda1, flat, kk, nc, add, C1, c0, tmp)
            _tn_rows(A2, kb * lda2, lda2, flat, kk, nc, add, C2, c0, tmp)


@njit(**_JIT)
def _empty_panels(npn, K):
    """An uninitialised (npn, K, NR) float32 array, 64-byte aligned (so that
    no vector load of a panel straddles two cache lines; Numba aligns to 32)."""
    size = npn * K * NR
    raw = np.empty(size + 16, np.float32)
    off = (16 - (raw.ctypes.data // 4) % 16) % 16
    return raw[off:off + size].reshape((npn, K, NR))


@njit(**_JIT)
def _zero_padding(out, n):
    """Zero the columns past n of the last panel of out (np, K, NR)."""
    if n % NR:
        last = out[out.shape[0] - 1]
        for k in range(last.shape[0]):
            for c in range(n % NR, NR):
                last[k, c] = 0


@njit(**_JIT)
def _pack_panels(U, G, j0, j1):
    """The columns of units [j0, j1) of U's G gate blocks (U (K, G*H)), as
    n = G*w columns q*w + u in panels (np, K, NR), padding zero."""
    K, GH = U.shape
    H, w = GH // G, j1 - j0
    n = G * w
    out = _empty_panels((n + NR - 1) // NR, K)
    _zero_padding(out, n)
    for p in range(out.shape[0]):
        c = 0
        while c < NR and p * NR + c < n:   # the panel's runs of one gate block
            j = p * NR + c
            q = j // w
            run = min(NR - c, w - (j - q * w))
            src = q * H + j0 + j - q * w
            for k in range(K):
                _copy_run(out[p, k], c, U[k], src, run)
            c += run
    return out


@njit(**_JIT)
def _pack_t_panels(U, j0, j1):
    """The transpose of U's rows [j0, j1) (U (H, K)): the K x w matrix of
    columns u = U[j0 + u, :], in panels (np, K, NR), padding zero."""
    K = U.shape[1]
    w = j1 - j0
    out = _empty_panels((w + NR - 1) // NR, K)
    _zero_padding(out, w)
    for p in range(out.shape[0]):
        panel = out[p]
        for c in range(min(NR, w - p * NR)):
            row = U[j0 + p * NR + c]
            for k in range(K):
                panel[k, c] = row[k]
    return out


def pack_columns(U, G, j0, j1):
    """A thread's columns of U (units [j0, j1) of each of the G gate
    blocks), packed for ``product``: panels for float32, a contiguous
    (K, G*w) matrix for float64 (typing stub)."""


def pack_rows_t(U, j0, j1):
    """U[j0:j1].T packed for ``product`` (the backward's dz U^T): panels for
    float32, the transposed view for float64 (typing stub)."""


def product(a, P, out):
    """out[:, :cols(P)] = a @ P for a P from ``pack_columns``/``pack_rows_t``
    (typing stub)."""


def cols(P):
    """The columns ``product`` writes for P (panels: a multiple of NR)
    (typing stub)."""


def project(A, P, G, H, j0, w, Z):
    """Z's columns of units [j0, j0 + w) of each of the G gate blocks = A @
    W's columns packed by ``pack_columns`` (float32: panels, float64: a
    plain matrix, by BLAS) (typing stub)."""


def product_tn2(A1, A2, Bm, b0, C1, C2, s, acc):
    """C1 = A1.T @ Bm[:, b0:b0 + n], C2 = A2.T @ the same and s = its column
    sums (n = C2.shape[1]), or all three added to when acc (the weight
    gradients dW, dU and db; Bm C-contiguous): float32 on packed panels,
    one packing for both (``_tn_product2``), float64 by BLAS (typing
    stub)."""


@overload(pack_columns, jit_options=_JIT)
def _pack_columns_impl(U, G, j0, j1):
    if U.dtype == types.float32:
        return lambda U, G, j0, j1: _pack_panels(U, G, j0, j1)

    def plain(U, G, j0, j1):
        K, GH = U.shape
        H, w = GH // G, j1 - j0
        out = np.empty((K, G * w), U.dtype)
        for k in range(K):
            for q in range(G):
                out[k, q * w:(q + 1) * w] = U[k, q * H + j0:q * H + j1]
        return out
    return plain


@overload(pack_rows_t, jit_options=_JIT)
def _pack_rows_t_impl(U, j0, j1):
    if U.dtype == types.float32:
        return lambda U, j0, j1: _pack_t_panels(U, j0, j1)
    return lambda U, j0, j1: U[j0:j1].T


@overload(product, jit_options=_JIT)
def _product_impl(a, P, out):
    if P.ndim == 3:
        return lambda a, P, out: _panel_product(a, P, out)

    def blas(a, P, out):
        # one row by GEMV (GEMM would pack P on every step)
        if a.shape[0] == 1:
            np.dot(a[0], P, out[0])
        else:
            np.dot(a, P, out)
    if isinstance(a, types.Array) and a.layout != "C":
        # rows that are not contiguous (a step's states read from the
        # batch-major outputs): BLAS takes a contiguous copy (a row of
        # states per batch row, small beside the product)
        def copied(a, P, out):
            ac = np.ascontiguousarray(a)
            if ac.shape[0] == 1:
                np.dot(ac[0], P, out[0])
            else:
                np.dot(ac, P, out)
        return copied
    return blas


@overload(project, jit_options=_JIT)
def _project_impl(A, P, G, H, j0, w, Z):
    if P.ndim == 3:
        return lambda A, P, G, H, j0, w, Z: _project_panels(A, P, G, H, j0, w, Z)

    def blas(A, P, G, H, j0, w, Z):
        if A.shape[1] == 0:
            part = np.zeros((A.shape[0], G * w), Z.dtype)
        else:
            part = np.dot(np.ascontiguousarray(A), P)
        for q in range(G):
            Z[:, q * H + j0:q * H + j0 + w] = part[:, q * w:(q + 1) * w]
    return blas


@njit(**_JIT)
def _blas_tn(A, cols, C, acc):
    """C = A.T @ cols, or C += that when acc, by BLAS (float64)."""
    if A.shape[1] == 0:
        return
    part = np.dot(np.ascontiguousarray(A).T, cols)
    if acc:
        C += part
    else:
        C[:, :] = part


@overload(product_tn2, jit_options=_JIT)
def _product_tn2_impl(A1, A2, Bm, b0, C1, C2, s, acc):
    if A1.dtype == types.float32:
        return lambda A1, A2, Bm, b0, C1, C2, s, acc: _tn_product2(
            A1, A2, Bm, b0, C1, C2, s, acc)

    def blas(A1, A2, Bm, b0, C1, C2, s, acc):
        n = C2.shape[1]
        # a block of columns is copied for BLAS
        cols = Bm if b0 == 0 and n == Bm.shape[1] else \
            np.ascontiguousarray(Bm[:, b0:b0 + n])
        _blas_tn(A1, cols, C1, acc)
        _blas_tn(A2, cols, C2, acc)
        if not acc:
            s[:] = 0
        for r in range(cols.shape[0]):
            for c in range(n):
                s[c] += cols[r, c]
    return blas


@overload(cols, jit_options=_JIT)
def _cols_impl(P):
    if P.ndim == 3:
        return lambda P: P.shape[0] * NR
    return lambda P: P.shape[1]
