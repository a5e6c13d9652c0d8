"""Tiny models for the online/generation tests (built in-process, weights scaled so logits are peaked)."""

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from mcpo_jax.models import ModelConfig, Transformer


def tiny_config(vocab_size=48, **overrides) -> ModelConfig:
    fields = dict(model_type="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=256, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(config=None, *, seed=0, std=0.25, **overrides) -> Transformer:
    """Random Transformer whose matrices have std `std` (the default 0.02 gives near-uniform logits, and
    near-ties make argmax comparisons flaky). Built from numpy values on an abstract model: eager init
    compiles one tiny program per parameter shape, which costs seconds on a loaded CPU."""
    config = config or tiny_config(**overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def value(x):
        if len(x.shape) < 2:  # norm weights
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree.map(value, state))
