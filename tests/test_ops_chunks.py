"""The compiled backends' backward pass in chunks of time steps: several
chunks with a ragged last one (forced small through fastrnn.ops' chunk
constants), with masks, go_backwards and kernel threads, against
fastrnn.reference; the chunk size rule; the (Tc, B, G*H) scratch the kernels
get; and d_outputs read as given (batch-major, any layout, read-only)."""
import numpy as np
import pytest

import fastrnn
from fastrnn import _backend, ops

COMPILED = [b for b in fastrnn.available_backends() if b != "numpy"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 steps whatever B is: T = 10 runs as 4 + 4 + 2."""
    monkeypatch.setattr(ops, "_CHUNK_ROWS", 1)
    monkeypatch.setattr(ops, "_MIN_CHUNK_STEPS", 3)
    assert ops._chunk_steps(10, 4) == 4


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request, monkeypatch, kernels):
    """1 or 3 threads, the kernels' team used whatever the size."""
    monkeypatch.setattr(_backend, "_num_threads", None)
    kernels.threads_at_any_size(monkeypatch)
    fastrnn.set_num_threads(request.param)
    return request.param


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("mask", [None, "random", "left_padded", "empty_rows"])
@pytest.mark.parametrize("kind,activation", [("lstm", "tanh"), ("rnn", "tanh"),
                                             ("rnn", "relu")])
@pytest.mark.parametrize("B", [4, 13], ids=["B4", "B13"])
def test_chunked_backward_matches_reference(backend, dtype, kind, activation,
                                            mask, go_backwards, threads, B,
                                            small_chunks, rng, kernels):
    # H = 20 (2 chunks of units): 3 threads split the units at B = 4 and
    # the batch rows at B = 13 (see test_ops_parallel's plan test)
    p = kernels.make_problem(rng, kind, B, 10, 3, 20, dtype,
                             activation=activation, mask=mask,
                             go_backwards=go_backwards)
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_reference(p), backend)


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("kind,activation", [("lstm", "tanh"), ("rnn", "tanh"),
                                             ("rnn", "linear")])
def test_states_before_a_rows_first_step_come_from_h0(backend, dtype, kind,
                                                       activation, go_backwards,
                                                       threads, small_chunks, rng,
                                                       kernels):
    """The backward reads h_{t-1} from the outputs, which Keras's rule zeroes
    before a row's first unmasked step, and from h0 up to that step: rows
    whose first step (in reading order) is the first of the sequence, the
    last of a chunk (3), the first of the next (4), one inside a later chunk
    (6), the very last (9), or none, with a nonzero h0 and masked steps
    after the first one too (chunks of 4 steps: 4 + 4 + 2)."""
    B, T = 6, 10
    first = [0, 3, 4, 6, 9, T]
    mask = np.zeros((B, T), bool)
    for b, f in enumerate(first):
        mask[b, f:] = True
        mask[b, f + 2::3] = False   # masked steps later on as well
        mask[b, f:f + 1] = f < T    # (the first one taken)
    if go_backwards:   # the same first steps in reading order
        mask = mask[:, ::-1].copy()
    p = kernels.make_problem(rng, kind, B, T, 3, 7, dtype, activation=activation,
                             mask=mask, go_backwards=go_backwards)
    assert np.abs(p["h0"]).min() > 0
    kernels.assert_results_close(kernels.run_ops(p, backend),
                                 kernels.run_reference(p), backend)


@pytest.mark.parametrize("min_steps", [1, 3, 4, 10])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_every_chunk_size_gives_the_same_gradients(backend, kind, min_steps,
                                                   monkeypatch, rng, kernels):
    """Tc = 1, 4 (4 + 4 + 2), 5 (5 + 5) and 10 (one chunk); I = 0 too."""
    monkeypatch.setattr(ops, "_CHUNK_ROWS", 1)
    monkeypatch.setattr(ops, "_MIN_CHUNK_STEPS", min_steps)
    for I in (0, 2):
        p = kernels.make_problem(rng, kind, 3, 10, I, 5, np.float64,
                                 mask="random")
        kernels.assert_results_close(kernels.run_ops(p, backend),
                                     kernels.run_reference(p),
                                     f"{backend} I={I}")


def test_chunk_steps_rule():
    for T in (1, 2, 7, 8, 9, 100, 513):
        for B in (1, 3, 32, 64, 128, 2000):
            tc = ops._chunk_steps(T, B)
            assert 1 <= tc <= T
            # every chunk but a shorter last one has the minimum size
            assert tc == T or (tc * B >= ops._CHUNK_ROWS
                               and tc >= ops._MIN_CHUNK_STEPS), (T, B, tc)
            n_chunks = -(-T // tc)
            assert tc * (n_chunks - 1) < T
    assert ops._chunk_steps(100, 32) == 9       # 11 chunks of 9 steps + 1
    assert ops._chunk_steps(50, 64) == 5        # 10 x 5
    assert ops._chunk_steps(100, 16) == 17      # 5 x 17 + 15
    assert ops._chunk_steps(100, 1) == 100      # one chunk
    assert ops._chunk_steps(20, 128) == 2       # 10 x 2: 256 rows each


@pytest.mark.parametrize("backend_name", COMPILED)
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_kernels_get_one_chunk_of_scratch(backend_name, kind, monkeypatch,
                                          rng, kernels):
    """dz holds one chunk of steps (and xs one chunk's rows of x, dx and
    h_{t-1}); x, the forward's outputs (the states h), d_outputs and dx
    reach the kernel batch-major (B, T, ...), the caller's d_outputs itself,
    not time-major copies."""
    B, T, H = 32, 100, 8
    G = 4 if kind == "lstm" else 1
    module = _backend.module(backend_name)
    real = getattr(module, f"{kind}_backward")
    seen = {}

    def spy(*args):
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        seen["dz"] = arrays[-4].shape   # ..., dz, work, pack, xs
        seen["xs"] = arrays[-1].shape
        seen["x"] = arrays[0].shape
        seen["bth"] = [a for a in arrays if a.shape == (B, T, H)]
        seen["dx"] = [a.shape for a in arrays].count((B, T, 3))
        return real(*args)

    monkeypatch.setattr(module, f"{kind}_backward", spy)
    p = kernels.make_problem(rng, kind, B, T, 3, H, np.float32)
    kernels.run_ops(p, backend_name)
    assert seen["dz"] == (ops._chunk_steps(T, B), B, G * H) == (9, B, G * H)
    assert seen["xs"] == (9 * B * (2 * 3 + H),)
    assert seen["x"] == (B, T, 3) and seen["dx"] == 2     # x and dx
    outputs, d_out = seen["bth"]                           # and no other
    assert np.shares_memory(d_out, p["d_outputs"])
    assert not np.shares_memory(outputs, d_out)


@pytest.mark.parametrize("layout", ["fortran", "strided", "read_only"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_d_outputs_in_any_layout(backend, kind, layout, small_chunks, rng,
                                 kernels):
    p = kernels.make_problem(rng, kind, 4, 10, 3, 6, np.float64,
                             mask="random")
    d = p["d_outputs"]
    if layout == "fortran":
        given = np.asfortranarray(d)
    elif layout == "strided":
        given = np.repeat(d, 2, axis=1)[:, ::2]
    else:
        given = d.copy()
        given.flags.writeable = False
    assert np.array_equal(given, d)
    kernels.assert_results_close(kernels.run_ops(p, backend, d_outputs=given),
                                 kernels.run_reference(p), f"{backend} {layout}")
