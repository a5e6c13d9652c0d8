"""Named model shapes and randomly initialised models (benchmarks, tests, smoke runs)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mcpo_jax.sharding import DEFAULT_RULES, model_layout, tree_shardings

from .config import ModelConfig
from .decoder import Transformer, logical_axes

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # Tests and CPU smoke runs.
    "tiny": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # meta-llama/Llama-3.2-1B
    "llama-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.1-8B
    "llama-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": ModelConfig(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    ),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The named shape, with optional field overrides (e.g. num_hidden_layers=2, vocab_size=...)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def init_random(
    config: ModelConfig | str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    mesh=None,
    rules=None,
    remat: bool | str = False,
    attention_impl: str | None = None,
) -> Transformer:
    """A Transformer with random weights (normal(0.02), unit norms), created inside one jit.

    With a mesh, each parameter is produced directly on the sharding its logical axes map to
    (no full host or single-device copy); without, on the default device.
    """
    if isinstance(config, str):
        config = preset_config(config)
    rules = DEFAULT_RULES if rules is None else tuple(rules)
    graphdef, create = _creator(config, jnp.dtype(dtype), jnp.dtype(param_dtype), remat, attention_impl, mesh, rules)
    return nnx.merge(graphdef, create(jnp.uint32(seed)))


@functools.lru_cache(maxsize=16)
def _creator(config, dtype, param_dtype, remat, attention_impl, mesh, rules):
    """(graphdef, jitted seed -> state); cached so repeated calls compile the initialiser once."""

    def make(seed):
        return Transformer(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attention_impl=attention_impl, layout=model_layout(mesh, rules),
                           rngs=nnx.Rngs(jax.random.key(seed)))

    abstract = nnx.eval_shape(lambda: make(0))
    graphdef, abstract_state = nnx.split(abstract)
    out_shardings = None
    if mesh is not None:
        out_shardings = tree_shardings(logical_axes(abstract), abstract_state, mesh, rules)
    return graphdef, jax.jit(lambda seed: nnx.split(make(seed))[1], out_shardings=out_shardings)
