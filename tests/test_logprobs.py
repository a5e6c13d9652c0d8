"""Chunked per-sequence log-probs against a full log-softmax reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax import logprobs

N, T, D, V = 3, 37, 8, 53


def _inputs(seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (N, T, D), jnp.float32)
    head = jax.random.normal(k2, (D, V), jnp.float32) * 0.5
    ids = jax.random.randint(k3, (N, T), 0, V)
    mask = (jax.random.uniform(k4, (N, T)) > 0.3).astype(jnp.int32)
    return hidden, head, ids, mask


def _naive(hidden, head, ids, mask):
    return logprobs.naive_sequence_logps(hidden @ head, ids, mask)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 36, 128])
def test_matches_full_log_softmax(chunk_size):
    hidden, head, ids, mask = _inputs()
    got = logprobs.sequence_logps(hidden, head, ids, mask, chunk_size=chunk_size)
    want = _naive(hidden, head, ids, mask)
    assert got.shape == (N,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert float(jnp.abs(want).min()) > 1.0  # nontrivial values


def test_gradient_matches_reference():
    hidden, head, ids, mask = _inputs(1)
    w = jnp.arange(1.0, N + 1.0)

    def f(fn, h, W):
        return jnp.sum(w * fn(h, W))

    g_chunk = jax.grad(lambda h, W: f(lambda a, b: logprobs.sequence_logps(a, b, ids, mask, chunk_size=8), h, W),
                       argnums=(0, 1))(hidden, head)
    g_ref = jax.grad(lambda h, W: f(lambda a, b: _naive(a, b, ids, mask), h, W), argnums=(0, 1))(hidden, head)
    for a, b in zip(g_chunk, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Positions whose next token is masked out get no gradient; the last position never does.
    assert float(jnp.abs(g_chunk[0][:, -1]).max()) == 0.0


def test_no_full_float32_logits_in_forward_or_backward():
    hidden, head, ids, mask = _inputs(2)
    fn = lambda h, W: jnp.sum(logprobs.sequence_logps(h, W, ids, mask, chunk_size=8))
    text = str(jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, head))
    assert f"f32[{N},8,{V}]" in text  # one chunk of logits exists ...
    for t in range(9, T + 1):  # ... never a longer stretch of the sequence
        assert f"f32[{N},{t},{V}]" not in text


def test_bf16_hidden_close_to_float32():
    hidden, head, ids, mask = _inputs(3)
    got = logprobs.sequence_logps(hidden.astype(jnp.bfloat16), head, ids, mask, chunk_size=16)
    want = _naive(hidden, head, ids, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=0.5)


def _completion_inputs(seed=4):
    """Right-padded rows: a prompt of 5..9 tokens, then a completion of 4..12 (loss mask 1), then padding."""
    hidden, head, ids, _ = _inputs(seed)
    rng = np.random.default_rng(seed)
    mask = np.zeros((N, T), np.int32)
    for row in range(N):
        p, c = rng.integers(5, 10), rng.integers(4, 13)
        mask[row, p:p + c] = 1
    mask[0, T - 12:] = 1  # a completion that ends at the last position: the window moves left to fit
    mask[0, :T - 12] = 0
    return hidden, head, ids, jnp.asarray(mask)


@pytest.mark.parametrize("window", [12, 20])
def test_completion_window_same_values_and_gradients(window):
    """The LM head on the completion window only: same log-probs and the same gradient for the hidden states
    and the head, to float tolerance, with the head run on `window` of the T - 1 positions."""
    hidden, head, ids, mask = _completion_inputs()
    w = jnp.arange(1.0, N + 1.0)
    full = lambda h, W: jnp.sum(w * logprobs.sequence_logps(h, W, ids, mask, chunk_size=8))
    win = lambda h, W: jnp.sum(w * logprobs.sequence_logps(h, W, ids, mask, chunk_size=8, window=window))
    (v0, g0), (v1, g1) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head) for f in (full, win))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(jnp.sum(logprobs.window_overflow(mask, window))) == 0
    # the head ran on [N, window] positions (padded to whole chunks), never on all T - 1
    text = str(jax.make_jaxpr(win)(hidden, head))
    assert f"f32[{N},8,{V}]" in text and f"f32[{N},{T - 1},{V}]" not in text
    assert int(jnp.sum(logprobs.window_overflow(mask, 3))) > 0  # a too-short window is counted


def test_backward_keeps_the_softmax_and_runs_no_head_forward_again():
    """The chunk's backward is two matmuls (dh, dW) from the saved softmax: the head's forward matmul runs
    once per chunk, not twice (no recompute)."""
    hidden, head, ids, mask = _inputs(5)
    fn = lambda h, W: jnp.sum(logprobs.sequence_logps(h, W, ids, mask, chunk_size=8))
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(hidden, head)
    text = str(jaxpr)
    # [N,8,D] x [D,V] -> [N,8,V] forward products: one per chunk loop body (the forward scan only)
    assert text.count("remat") == 0 and "checkpoint" not in text
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    inner = [str(e.params["jaxpr"]) for e in dots]
    fwd_products = sum(t.count(f"f32[{N},8,{V}] = dot_general") for t in inner)
    assert fwd_products == 1, inner


def test_sequence_logps_equal_transformers_sum_over_completion_tokens(tmp_path):
    """An independent reference: transformers' PyTorch Llama on the same weights, its logits log-softmaxed and
    log p(x_t | x_<t) summed over the completion tokens by an explicit loop (no shared shift/mask code)."""
    torch = pytest.importorskip("torch")
    import transformers

    from mcpo_jax import models
    from mcpo_jax.training import state as state_lib
    from mcpo_jax.training import step as step_lib

    from _models_fixtures import HF_CONFIGS, random_model

    config = models.ModelConfig.from_hf(HF_CONFIGS["llama_gqa_llama3_tied"])
    folder = str(tmp_path / "m")
    models.save_pretrained(random_model(config, seed=3), folder)
    rng = np.random.RandomState(0)
    prompts, completions = (5, 3, 7), (6, 9, 2)  # right-padded rows: prompt, completion, padding
    t = 16
    ids = rng.randint(1, config.vocab_size, (3, t)).astype(np.int32)
    mask = np.zeros((3, t), np.int32)
    loss_mask = np.zeros((3, t), np.int32)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        mask[r, :p + c] = 1
        loss_mask[r, p:p + c] = 1
    ids = ids * mask
    graphdef, params, rest = state_lib.split_model(models.from_pretrained(folder))
    got = np.asarray(jax.jit(lambda p: step_lib.forward_logps(graphdef, p, rest, ids, mask, loss_mask,
                                                              chunk_size=4))(params))
    pt = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = []
    with torch.no_grad():
        for r, (p, c) in enumerate(zip(prompts, completions)):
            row = torch.tensor(ids[r:r + 1, :p + c], dtype=torch.long)  # the row alone, no padding at all
            logp = torch.log_softmax(pt(row).logits[0].double(), dim=-1)
            want.append(sum(float(logp[k - 1, row[0, k]]) for k in range(p, p + c)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
