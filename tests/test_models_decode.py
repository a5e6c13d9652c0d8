"""KV-cache decoding reproduces the full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax.models import ModelConfig

from _models_fixtures import HF_CONFIGS, logits, random_model

PROMPT, NEW = 6, 6  # 12 > sliding window 5 of the Mistral case


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, ids, positions, cache, index):
    return nnx.merge(graphdef, state).decode(ids, positions, cache, index)


def generate_logits(model, prompt_ids, prompt_mask, new_ids):
    """Prefill with the whole prompt, then one token per call; logits of every step."""
    graphdef, state = nnx.split(model)
    B = prompt_ids.shape[0]
    cache = model.init_cache(B, PROMPT + NEW)
    positions = np.where(prompt_mask == 1, np.cumsum(prompt_mask, axis=1) - 1, -1).astype(np.int32)
    prefill, cache = _decode(graphdef, state, prompt_ids, positions, cache, 0)
    lengths = prompt_mask.sum(axis=1)
    steps = []
    for j in range(NEW):
        step, cache = _decode(graphdef, state, new_ids[:, j : j + 1], (lengths + j)[:, None].astype(np.int32), cache, PROMPT + j)
        steps.append(np.asarray(step[:, 0]))
    return np.asarray(prefill), np.stack(steps, axis=1), cache


@pytest.mark.parametrize("name", ["mistral_sliding", "llama_gqa_llama3_tied"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_prefill_then_token_by_token_matches_full_forward(name, padding):
    config = ModelConfig.from_hf(HF_CONFIGS[name])
    model = random_model(config, seed=21)
    rng = np.random.RandomState(0)
    lengths = np.array([6, 4, 2])
    B = len(lengths)
    tokens = rng.randint(0, config.vocab_size, (B, PROMPT + NEW)).astype(np.int32)
    valid = np.arange(PROMPT)[None] < lengths[:, None]
    prompt_mask = valid if padding == "right" else valid[:, ::-1]
    prompt_mask = prompt_mask.astype(np.int32)
    prompt_ids = np.zeros((B, PROMPT), np.int32)
    for b in range(B):
        prompt_ids[b, prompt_mask[b] == 1] = tokens[b, : lengths[b]]
    new_ids = np.stack([tokens[b, lengths[b] : lengths[b] + NEW] for b in range(B)])

    prefill, steps, cache = generate_logits(model, prompt_ids, prompt_mask, new_ids)

    # reference: each row's real tokens (prompt then continuation), right-padded, one full forward
    full_ids = np.zeros((B, PROMPT + NEW), np.int32)
    full_mask = np.zeros((B, PROMPT + NEW), np.int32)
    for b in range(B):
        n = lengths[b] + NEW
        full_ids[b, :n] = tokens[b, :n]
        full_mask[b, :n] = 1
    ref = logits(model, full_ids, full_mask)
    for b in range(B):
        np.testing.assert_allclose(prefill[b][prompt_mask[b] == 1], ref[b, : lengths[b]], rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(steps[b], ref[b, lengths[b] : lengths[b] + NEW], rtol=1e-5, atol=2e-5)
    # padding slots stay empty; filled slots hold their positions
    pos = np.asarray(cache.pos)
    assert (pos[:, :PROMPT][prompt_mask == 0] == -1).all()
    assert (pos[:, PROMPT:] == lengths[:, None] + np.arange(NEW)[None]).all()


def test_init_cache_layout():
    config = ModelConfig.from_hf(HF_CONFIGS["mistral_sliding"])
    model = random_model(config)
    cache = model.init_cache(3, 10)
    assert cache.k.shape == cache.v.shape == (2, 3, 10, 2, 8)
    assert cache.k.dtype == jnp.float32 and cache.pos.dtype == jnp.int32
    assert (np.asarray(cache.pos) == -1).all()
    assert len(jax.tree.leaves(cache)) == 3  # a pytree: jit / donate friendly
