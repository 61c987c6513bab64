"""The NumPy reference: the readable specification of fastrnn's math.

Every compiled backend is tested against these functions.  They are written
for clarity, one time step at a time, in the public (batch, time, feature)
layout and with Keras's conventions:

* weights ``kernel`` (I, G*H), ``recurrent_kernel`` (H, G*H), ``bias`` (G*H,)
  with the LSTM gate blocks in the order i, f, c (candidate, "g"), o;
* ``mask[b, t] == False`` means row ``b`` skips step ``t``: its state carries
  over, and its output repeats the previous output (zeros before the row's
  first unmasked step), exactly as ``keras.src.backend.rnn`` does;
* ``go_backwards=True`` reads the sequence from its end and returns outputs in
  reading order.

Forward functions return ``(outputs, h, c, workspace)`` (``c`` only for the
LSTM); the workspace is a dict of everything the backward pass needs.
"""
import numpy as np

ACTIVATIONS = ("tanh", "relu", "linear")


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _activation(name, z):
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0)
    if name == "linear":
        return z
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _activation_grad_from_output(name, h):
    """d act / d z, written in terms of the activation's output h."""
    if name == "tanh":
        return 1 - h * h
    if name == "relu":
        return (h > 0).astype(h.dtype)
    return np.ones_like(h)


def _reading_order(x, mask, go_backwards):
    """Return (steps, mask_steps): lists in the order the cell reads them."""
    T = x.shape[1]
    order = range(T - 1, -1, -1) if go_backwards else range(T)
    xs = [x[:, t] for t in order]
    if mask is None:
        ms = [None] * T
    else:
        ms = [mask[:, t].astype(bool)[:, None] for t in order]
    return xs, ms


def lstm_forward(x, kernel, recurrent_kernel, bias, h0, c0, mask=None,
                 go_backwards=False):
    """x (B, T, I); kernel (I, 4H); recurrent_kernel (H, 4H); bias (4H,);
    h0, c0 (B, H); mask (B, T) bool or None.

    Returns outputs (B, T, H), h (B, H), c (B, H), workspace.
    """
    B, T, _ = x.shape
    H = recurrent_kernel.shape[0]
    h, c = h0.copy(), c0.copy()
    out_prev = np.zeros_like(h0)
    xs, ms = _reading_order(x, mask, go_backwards)
    outputs, steps = [], []
    for x_t, m in zip(xs, ms):
        z = x_t @ kernel + h @ recurrent_kernel + bias
        i = sigmoid(z[:, 0 * H:1 * H])
        f = sigmoid(z[:, 1 * H:2 * H])
        g = np.tanh(z[:, 2 * H:3 * H])
        o = sigmoid(z[:, 3 * H:4 * H])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        steps.append(dict(x=x_t, h_prev=h, c_prev=c, i=i, f=f, g=g, o=o,
                          c=c_new, m=m))
        if m is None:
            h, c, out = h_new, c_new, h_new
        else:
            h = np.where(m, h_new, h)
            c = np.where(m, c_new, c)
            out = np.where(m, h_new, out_prev)
        outputs.append(out)
        out_prev = out
    outputs = np.stack(outputs, axis=1) if T else np.zeros((B, 0, H), x.dtype)
    ws = dict(kind="lstm", steps=steps, kernel=kernel,
              recurrent_kernel=recurrent_kernel, shape=(B, T, x.shape[2], H),
              dtype=x.dtype, go_backwards=go_backwards, has_mask=mask is not None)
    return outputs, h, c, ws


def lstm_backward(ws, d_outputs, d_h, d_c):
    """Backpropagation through time for ``lstm_forward``.

    d_outputs (B, T, H), d_h, d_c (B, H).  Returns a dict with the gradients
    x, h0, c0, kernel, recurrent_kernel, bias.
    """
    B, T, I, H = ws["shape"]
    W, U = ws["kernel"], ws["recurrent_kernel"]
    order = list(range(T - 1, -1, -1)) if ws["go_backwards"] else list(range(T))
    dW, dU = np.zeros_like(W), np.zeros_like(U)
    db = np.zeros(4 * H, dtype=W.dtype)
    dx = np.zeros((B, T, I), dtype=W.dtype)
    dh, dc = d_h.copy(), d_c.copy()
    d_out_carry = np.zeros_like(dh)   # gradient owed to the previous *output*
    for k in range(T - 1, -1, -1):
        s = ws["steps"][k]
        g_out = d_outputs[:, k] + d_out_carry   # outputs are in reading order
        m = s["m"]
        if m is None:
            dh_new = dh + g_out
            d_out_carry = np.zeros_like(dh)
        else:
            # out = where(m, h_new, out_prev); h = where(m, h_new, h_prev)
            dh_new = np.where(m, dh + g_out, 0)
            d_out_carry = np.where(m, 0, g_out)
        dc_new = dc if m is None else np.where(m, dc, 0)
        i, f, g, o, c = s["i"], s["f"], s["g"], s["o"], s["c"]
        tc = np.tanh(c)
        do = dh_new * tc
        dcc = dc_new + dh_new * o * (1 - tc * tc)
        dz = np.concatenate([dcc * g * i * (1 - i),
                             dcc * s["c_prev"] * f * (1 - f),
                             dcc * i * (1 - g * g),
                             do * o * (1 - o)], axis=1)
        dW += s["x"].T @ dz
        dU += s["h_prev"].T @ dz
        db += dz.sum(axis=0)
        dx[:, order[k]] = dz @ W.T
        dh_prev = dz @ U.T
        dc_prev = dcc * f
        if m is None:
            dh, dc = dh_prev, dc_prev
        else:
            dh = np.where(m, dh_prev, dh)
            dc = np.where(m, dc_prev, dc)
    return dict(x=dx, h0=dh, c0=dc, kernel=dW, recurrent_kernel=dU, bias=db)


def rnn_forward(x, kernel, recurrent_kernel, bias, h0, activation="tanh",
                mask=None, go_backwards=False):
    """x (B, T, I); kernel (I, H); recurrent_kernel (H, H); bias (H,);
    h0 (B, H).  h_t = act(x_t @ kernel + h_{t-1} @ recurrent_kernel + bias).

    Returns outputs (B, T, H), h (B, H), workspace.
    """
    B, T, _ = x.shape
    H = recurrent_kernel.shape[0]
    h = h0.copy()
    out_prev = np.zeros_like(h0)
    xs, ms = _reading_order(x, mask, go_backwards)
    outputs, steps = [], []
    for x_t, m in zip(xs, ms):
        h_new = _activation(activation, x_t @ kernel + h @ recurrent_kernel + bias)
        steps.append(dict(x=x_t, h_prev=h, h=h_new, m=m))
        if m is None:
            h, out = h_new, h_new
        else:
            h = np.where(m, h_new, h)
            out = np.where(m, h_new, out_prev)
        outputs.append(out)
        out_prev = out
    outputs = np.stack(outputs, axis=1) if T else np.zeros((B, 0, H), x.dtype)
    ws = dict(kind="rnn", steps=steps, kernel=kernel, activation=activation,
              recurrent_kernel=recurrent_kernel, shape=(B, T, x.shape[2], H),
              dtype=x.dtype, go_backwards=go_backwards, has_mask=mask is not None)
    return outputs, h, ws


def rnn_backward(ws, d_outputs, d_h):
    """Backpropagation through time for ``rnn_forward``.

    Returns a dict with the gradients x, h0, kernel, recurrent_kernel, bias.
    """
    B, T, I, H = ws["shape"]
    W, U = ws["kernel"], ws["recurrent_kernel"]
    order = list(range(T - 1, -1, -1)) if ws["go_backwards"] else list(range(T))
    dW, dU = np.zeros_like(W), np.zeros_like(U)
    db = np.zeros(H, dtype=W.dtype)
    dx = np.zeros((B, T, I), dtype=W.dtype)
    dh = d_h.copy()
    d_out_carry = np.zeros_like(dh)
    for k in range(T - 1, -1, -1):
        s = ws["steps"][k]
        g_out = d_outputs[:, k] + d_out_carry   # outputs are in reading order
        m = s["m"]
        if m is None:
            dh_new = dh + g_out
            d_out_carry = np.zeros_like(dh)
        else:
            dh_new = np.where(m, dh + g_out, 0)
            d_out_carry = np.where(m, 0, g_out)
        dz = dh_new * _activation_grad_from_output(ws["activation"], s["h"])
        dW += s["x"].T @ dz
        dU += s["h_prev"].T @ dz
        db += dz.sum(axis=0)
        dx[:, order[k]] = dz @ W.T
        dh_prev = dz @ U.T
        dh = dh_prev if m is None else np.where(m, dh_prev, dh)
    return dict(x=dx, h0=dh, kernel=dW, recurrent_kernel=dU, bias=db)
