"""Shared fixtures for the trainer tests: a toy causal LM with the Transformer's interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ToyLM(nnx.Module):
    """Embedding -> causal prefix mean -> MLP -> LM head: cheap, causal, with logical axes."""

    def __init__(self, vocab=23, dim=8, *, seed=0):
        rngs = nnx.Rngs(seed)
        init = nnx.initializers.normal(0.5)
        self.embed = nnx.Param(init(rngs.params(), (vocab, dim)))
        self.w1 = nnx.Param(init(rngs.params(), (dim, 2 * dim)))
        self.w2 = nnx.Param(init(rngs.params(), (2 * dim, dim)))
        self.head = nnx.Param(init(rngs.params(), (dim, vocab)))

    def hidden_states(self, input_ids, attention_mask=None):
        h = self.embed[...][input_ids]
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        count = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        prefix = jnp.cumsum(h, axis=1) / count
        return prefix + jnp.tanh(prefix @ self.w1[...]) @ self.w2[...]

    def lm_head_kernel(self):
        return self.head[...]

    def __call__(self, input_ids, attention_mask=None):
        return self.hidden_states(input_ids, attention_mask) @ self.head[...]


TOY_AXES = {"embed": ("vocab", "embed"), "w1": ("embed", "mlp"), "w2": ("mlp", "embed"), "head": ("embed", "vocab")}


def toy_batch(b=4, c=4, t=12, vocab=23, seed=0, accum=None):
    """A random preference batch with the data pipeline's keys ([b, C, T] etc.)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(b, c, t)).astype(np.int32)
    prompt_len = 4
    lengths = rng.integers(3, t - prompt_len + 1, size=(b, c))
    pos = np.arange(t)[None, None, :]
    attn = (pos < prompt_len + lengths[..., None]).astype(np.int32)
    loss_mask = ((pos >= prompt_len) & (attn == 1)).astype(np.int32)
    ids = ids * attn
    valid = np.ones((b, c), bool)
    if c > 2:
        valid[0, -1] = False
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "valid": valid,
        "ranks": np.tile(np.arange(1, c + 1, dtype=np.int32), (b, 1)),
        "fixed_index": np.full((b,), 1, np.int32),
    }
    if accum:
        batch = {k: v.reshape((accum, b // accum) + v.shape[1:]) for k, v in batch.items()}
    return batch
