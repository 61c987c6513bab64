"""Argument checking for fastrnn.ops: clear errors naming the argument."""
import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_float_array(name, a, ndim, dtype=None):
    """``a`` as a NumPy float32/float64 array of rank ``ndim``.

    ``dtype`` (when given) is the dtype every argument of the call must share.
    """
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be an array-like of floats: {exc}") from None
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, "
                        f"got {arr.dtype}")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name} has dtype {arr.dtype} but x has {dtype}: "
                        f"all arrays of a call must share one dtype")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {arr.shape}")
    return arr


def check_shape(name, arr, expected):
    """``expected`` is a tuple of ints naming the required shape."""
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, "
                         f"got {arr.shape}")


def optional_state(name, a, B, H, dtype):
    if a is None:
        return np.zeros((B, H), dtype=dtype)
    arr = as_float_array(name, a, 2, dtype)
    check_shape(name, arr, (B, H))
    return arr


def weights(x, kernel, recurrent_kernel, bias, gates):
    """Check x (B, T, I), kernel (I, G*H), recurrent_kernel (H, G*H), bias."""
    x = as_float_array("x", x, 3)
    dtype = x.dtype
    B, T, I = x.shape
    kernel = as_float_array("kernel", kernel, 2, dtype)
    recurrent_kernel = as_float_array("recurrent_kernel", recurrent_kernel, 2, dtype)
    H = recurrent_kernel.shape[0]
    check_shape("recurrent_kernel", recurrent_kernel, (H, gates * H))
    if kernel.shape != (I, gates * H):
        raise ValueError(
            f"kernel must have shape (I, {gates}*H) = ({I}, {gates * H}) to "
            f"match x (B, T, I) = {x.shape} and recurrent_kernel (H, {gates}*H)"
            f" = {recurrent_kernel.shape}, got {kernel.shape}")
    if bias is None:
        bias = np.zeros(gates * H, dtype=dtype)
    else:
        bias = as_float_array("bias", bias, 1, dtype)
        check_shape("bias", bias, (gates * H,))
    return x, kernel, recurrent_kernel, bias, (B, T, I, H)


def mask_array(mask, B, T):
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise TypeError(f"mask must be a bool array of shape (B, T) = "
                        f"{(B, T)}, got dtype {arr.dtype}")
    if arr.shape != (B, T):
        raise ValueError(f"mask must have shape (B, T) = {(B, T)}, "
                         f"got {arr.shape}")
    return arr.astype(bool, copy=False)


def flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)
