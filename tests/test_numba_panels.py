"""The Numba backend's packed-weight product (fastrnn/_numba_panels.py):
packing and the register-blocked tiles against NumPy, at every row count
the tiles cut (8, 4, 2, 1 and their sums), with padding columns, gate
blocks, row strides and read-only inputs."""
import numpy as np
import pytest

import fastrnn

if "numba" not in fastrnn.available_backends():   # pragma: no cover
    pytest.skip("numba is not installed", allow_module_level=True)

from numba import njit  # noqa: E402
from numba.core.errors import TypingError  # noqa: E402

from fastrnn import _numba_panels as panels  # noqa: E402


@njit
def _pack_columns(U, G, j0, j1):
    return panels.pack_columns(U, G, j0, j1)


@njit
def _pack_rows_t(U, j0, j1):
    return panels.pack_rows_t(U, j0, j1)


@njit
def _product(a, P, out):
    panels.product(a, P, out)


@njit
def _cols(P):
    return panels.cols(P)


def _gate_columns(U, G, j0, j1):
    H = U.shape[1] // G
    return np.concatenate([U[:, q * H + j0:q * H + j1] for q in range(G)], axis=1)


# (K, H, G, j0, j1): whole layers and one thread's slices, widths that do and
# do not fill whole panels of 32 columns
SLICES = [(1, 16, 4, 0, 16), (7, 48, 4, 16, 48), (64, 64, 4, 0, 64),
          (130, 100, 4, 0, 100), (128, 256, 1, 32, 96), (5, 3, 1, 0, 3),
          (33, 40, 4, 16, 40)]


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 21])
@pytest.mark.parametrize("K,H,G,j0,j1", SLICES,
                         ids=[f"K{s[0]}-H{s[1]}-G{s[2]}-{s[3]}:{s[4]}" for s in SLICES])
def test_float32_product_on_packed_columns_matches_numpy(M, K, H, G, j0, j1):
    rng = np.random.default_rng(M * 1000 + K)
    U = rng.standard_normal((K, G * H)).astype(np.float32)
    P = _pack_columns(U, G, j0, j1)
    n = G * (j1 - j0)
    assert P.ndim == 3 and P.shape == (-(-n // 32), K, 32)
    assert P.ctypes.data % 64 == 0
    flat = P.transpose(1, 0, 2).reshape(K, -1)
    np.testing.assert_array_equal(flat[:, :n], _gate_columns(U, G, j0, j1))
    np.testing.assert_array_equal(flat[:, n:], 0)          # padding
    # rows of a with a stride longer than K (a view into a wider array)
    a = rng.standard_normal((M, K + 3)).astype(np.float32)[:, 1:K + 1]
    a.flags.writeable = False
    out = np.full((M, _cols(P)), np.nan, np.float32)
    _product(a, P, out)
    expected = a.astype(np.float64) @ _gate_columns(U, G, j0, j1).astype(np.float64)
    np.testing.assert_allclose(out[:, :n], expected, rtol=2e-5,
                               atol=2e-5 * np.sqrt(K))
    np.testing.assert_array_equal(out[:, n:], 0)


@pytest.mark.parametrize("M", [1, 3, 8, 13])
@pytest.mark.parametrize("H,K,j0,j1", [(17, 68, 0, 17), (64, 256, 32, 64), (40, 9, 0, 40)])
def test_float32_product_on_packed_transposed_rows_matches_numpy(M, H, K, j0, j1):
    rng = np.random.default_rng(M + H)
    U = rng.standard_normal((H, K)).astype(np.float32)
    P = _pack_rows_t(U, j0, j1)
    a = rng.standard_normal((M, K)).astype(np.float32)
    out = np.empty((M, _cols(P)), np.float32)
    _product(a, P, out)
    np.testing.assert_allclose(out[:, :j1 - j0], a.astype(np.float64) @ U[j0:j1].T,
                               rtol=2e-5, atol=2e-5 * np.sqrt(K))


def test_float64_keeps_plain_matrices_and_blas():
    rng = np.random.default_rng(0)
    U = rng.standard_normal((12, 4 * 20))
    P = _pack_columns(U, 4, 4, 20)
    assert P.ndim == 2 and P.shape == (12, 64)
    np.testing.assert_array_equal(P, _gate_columns(U, 4, 4, 20))
    for M in (1, 5):
        a = rng.standard_normal((M, 12))
        out = np.empty((M, _cols(P)))
        _product(a, P, out)
        np.testing.assert_allclose(out, a @ P, rtol=1e-13)
    Ut = _pack_rows_t(rng.standard_normal((20, 80)), 4, 20)
    assert Ut.ndim == 2 and Ut.shape == (80, 16)


def test_nan_and_inf_propagate_through_the_tiles():
    rng = np.random.default_rng(1)
    U = rng.standard_normal((10, 64)).astype(np.float32)
    P = _pack_columns(U, 1, 0, 64)
    a = rng.standard_normal((9, 10)).astype(np.float32)
    a[0, 3], a[8, 9] = np.nan, np.inf
    out = np.empty((9, 64), np.float32)
    _product(a, P, out)
    assert np.isnan(out[0]).all()
    assert not np.isfinite(out[8]).any()
    assert np.isfinite(out[1:8]).all()


def test_copy_refuses_arrays_that_are_not_contiguous():
    @njit
    def copy(d, s):
        panels._copy(d, 0, s, 0, 2)

    d = np.zeros(4, np.float32)
    with pytest.raises(TypingError):
        copy(d, np.zeros((4, 4), np.float32)[:, 0])   # a strided column
    copy(d, np.ones(4, np.float32))
    np.testing.assert_array_equal(d, [1, 1, 0, 0])


@njit
def _product_tn2(A1, A2, Bm, b0, C1, C2, s, acc):
    panels.product_tn2(A1, A2, Bm, b0, C1, C2, s, acc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("acc", [False, True], ids=["set", "add"])
@pytest.mark.parametrize("K", [1, 5, 128, 129, 300])
@pytest.mark.parametrize("M1, M2", [(0, 1), (3, 8), (8, 13), (21, 2)])
@pytest.mark.parametrize("b0, n", [(0, 32), (16, 16), (5, 70), (32, 33)])
def test_weight_gradient_products_match_numpy(b0, n, M1, M2, K, acc, dtype):
    """C1 (+)= A1.T @ Bm[:, b0:b0 + n], C2 (+)= A2.T @ the same and s (+)=
    its column sums (the backward's dW = x^T dz, dU = h^T dz and db for a
    thread's columns, one packing of dz for all three): float32 on the
    transposed-A tiles, in blocks of 128 rows of Bm (K = 129, 300: several,
    accumulated), whole and partial panels, tiles of every row count, no
    input (M1 = 0); C1, C2 and s slices of wider arrays (row stride);
    float64 by BLAS."""
    rng = np.random.default_rng(K * 100 + M1 * 10 + M2 + n)
    Bm = rng.standard_normal((K, b0 + n + 7)).astype(dtype)
    want_s = Bm[:, b0:b0 + n].astype(np.float64).sum(axis=0)
    wide_s = rng.standard_normal(n + 20).astype(dtype)
    before_s = wide_s.copy()
    As, Cs, wides, befores = [], [], [], []
    for M in (M1, M2):
        A = rng.standard_normal((K, M + 3)).astype(dtype)[:, 1:M + 1]   # row stride M + 3
        wide = rng.standard_normal((M, n + 20)).astype(dtype)
        As.append(A)
        wides.append(wide)
        befores.append(wide.copy())
        Cs.append(wide[:, 10:10 + n])
    _product_tn2(As[0], As[1], Bm, b0, Cs[0], Cs[1], wide_s[10:10 + n], acc)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for A, C, wide, before in zip(As, Cs, wides, befores):
        want = A.astype(np.float64).T @ Bm[:, b0:b0 + n].astype(np.float64)
        if acc:
            want += before[:, 10:10 + n]
        np.testing.assert_allclose(C, want, rtol=tol, atol=tol * np.sqrt(K))
        # the columns either side are left alone
        np.testing.assert_array_equal(wide[:, :10], before[:, :10])
        np.testing.assert_array_equal(wide[:, 10 + n:], before[:, 10 + n:])
    if acc:
        want_s += before_s[10:10 + n]
    np.testing.assert_allclose(wide_s[10:10 + n], want_s, rtol=tol, atol=tol * np.sqrt(K))
    np.testing.assert_array_equal(wide_s[:10], before_s[:10])
    np.testing.assert_array_equal(wide_s[10 + n:], before_s[10 + n:])


@njit
def _project(A, P, G, H, j0, w, Z):
    panels.project(A, P, G, H, j0, w, Z)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("M", [1, 5, 20, 64, 67, 130])
@pytest.mark.parametrize("K,H,G,j0,j1", SLICES + [(0, 40, 4, 16, 40)],
                         ids=[f"K{s[0]}-H{s[1]}-G{s[2]}-{s[3]}:{s[4]}"
                              for s in SLICES + [(0, 40, 4, 16, 40)]])
def test_input_projection_on_packed_columns_matches_numpy(M, K, H, G, j0, j1, dtype):
    """The forward's input projection of a thread's columns (units [j0, j1)
    of each gate block) from rows of x into rows of the pre-activations
    (both with a row stride: a batch row's steps, B rows apart), in blocks
    of 64 rows; panels that straddle gate blocks go through a buffer; the
    other columns are left alone; K = 0 gives zeros."""
    rng = np.random.default_rng(M * 1000 + K + j0)
    W = rng.standard_normal((K, G * H)).astype(dtype)
    A = rng.standard_normal((M, 3, K)).astype(dtype)[:, 1]      # row stride 3K
    Zfull = rng.standard_normal((M, 2, G * H)).astype(dtype)
    before = Zfull.copy()
    Z = Zfull[:, 0]
    P = _pack_columns(W, G, j0, j1)
    _project(A, P, G, H, j0, j1 - j0, Z)
    want = before[:, 0].copy()
    for q in range(G):
        cols = slice(q * H + j0, q * H + j1)
        want[:, cols] = A.astype(np.float64) @ W[:, cols].astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(Z, want, rtol=tol, atol=tol * max(1, np.sqrt(K)))
    np.testing.assert_array_equal(Zfull[:, 1], before[:, 1])
