"""ModelConfig parsing, presets, random init, logical axes, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcpo_jax.models import (
    PRESETS,
    ModelConfig,
    Transformer,
    UnsupportedConfigError,
    init_random,
    logical_axes,
    preset_config,
)

from _models_fixtures import HF_CONFIGS, batch, random_model

V5 = HF_CONFIGS["llama_gqa_llama3_tied"]
LEGACY = {
    **{k: v for k, v in V5.items() if k != "rope_parameters"},
    "rope_theta": 500000.0,
    "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8},
}


def test_both_rope_styles_parse_to_the_same_config():
    a, b = ModelConfig.from_hf(V5), ModelConfig.from_hf(LEGACY)
    assert a == b and hash(a) == hash(b)
    assert a.rope_theta == 500000.0 and a.rope_type == "llama3" and a.rope_scaling["factor"] == 4.0
    assert a.head_dim == 8 and a.num_key_value_heads == 2 and a.tie_word_embeddings


@pytest.mark.parametrize("style", ["v5", "legacy"])
def test_to_hf_round_trips_and_transformers_reads_it(style):
    from transformers import AutoConfig

    config = ModelConfig.from_hf(HF_CONFIGS["llama_untied_headdim_bias"]).replace(eos_token_id=(5, 6))
    hf = config.to_hf(rope_style=style)
    assert ModelConfig.from_hf(hf) == config
    tc = AutoConfig.for_model(**hf)
    assert tc.rope_parameters["rope_type"] == "linear" and tc.rope_parameters["factor"] == 2.0
    assert tc.rope_parameters["rope_theta"] == 10000.0 and tc.head_dim == 24 and tc.attention_bias


def test_plain_rope_and_defaults():
    c = ModelConfig.from_hf({k: v for k, v in HF_CONFIGS["mistral_sliding"].items() if k != "rope_parameters"})
    assert c.rope_scaling is None and c.rope_theta == 10000.0 and c.sliding_window == 5
    c = ModelConfig.from_hf({**V5, "head_dim": None, "num_key_value_heads": None, "eos_token_id": [1, 2]})
    assert c.head_dim == 32 // 4 and c.num_key_value_heads == 4 and c.eos_token_id == (1, 2)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"architectures": ["GemmaForCausalLM"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters.factor"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 3}},
         "rope_parameters.beta_fast"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_parameters"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_unsupported_options_name_the_key(change, key):
    with pytest.raises(UnsupportedConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_hf({**V5, **change})


def test_legacy_unsupported_rope_type_names_rope_scaling():
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling\.rope_type.*longrope"):
        ModelConfig.from_hf({**LEGACY, "rope_scaling": {"type": "longrope", "factor": 2.0}})


def test_presets_have_the_published_sizes():
    counts = {name: preset_config(name).num_params() for name in PRESETS}
    assert abs(counts["llama-1b"] - 1.236e9) < 0.01e9  # Llama-3.2-1B: 1.24B (tied)
    assert abs(counts["llama-8b"] - 8.030e9) < 0.01e9  # Llama-3.1-8B: 8.03B
    assert abs(counts["mistral-7b"] - 7.242e9) < 0.01e9  # Mistral-7B-v0.1: 7.24B
    abstract = nnx.eval_shape(lambda: Transformer(preset_config("llama-8b")))
    n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == counts["llama-8b"]
    with pytest.raises(KeyError, match="unknown model preset 'llama-70b'"):
        preset_config("llama-70b")


def test_init_random_is_seeded_and_cast():
    small = preset_config("tiny", num_hidden_layers=1, vocab_size=64)
    a = init_random(small, seed=1)
    b = init_random(small, seed=1)
    c = init_random(small, seed=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(a.embed[...]), np.asarray(b.embed[...]))
    assert not np.allclose(np.asarray(a.embed[...]), np.asarray(c.embed[...], np.float32))
    assert c.layers.q_proj[...].dtype == jnp.bfloat16 and c.dtype == jnp.bfloat16
    assert 0.015 < float(jnp.std(a.layers.q_proj[...])) < 0.025
    np.testing.assert_array_equal(np.asarray(a.layers.attn_norm[...]), 1.0)


def test_logical_axes_cover_every_param():
    config = ModelConfig.from_hf(HF_CONFIGS["llama_untied_headdim_bias"])
    model = nnx.eval_shape(lambda: Transformer(config))
    axes = dict(nnx.to_flat_state(logical_axes(model)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert axes.keys() == params.keys()
    allowed = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}
    for path, var in params.items():
        names = axes[path]
        assert len(names) == var.get_value().ndim and set(names) <= allowed, path
        assert (names[0] == "layers") == (path[0] == "layers"), path
    assert axes[("layers", "q_proj")] == ("layers", "embed", "heads", "head_dim")
    assert axes[("layers", "k_bias")] == ("layers", "kv_heads", "head_dim")
    assert axes[("lm_head",)] == ("embed", "vocab") and axes[("embed",)] == ("vocab", "embed")


def test_remat_gives_the_same_gradients_and_padding_rows_stay_finite():
    config = ModelConfig.from_hf(HF_CONFIGS["mistral_sliding"])
    ids, mask = batch(config.vocab_size)
    mask[-1] = 0  # an all-padding row (e.g. an absent candidate) must keep everything finite

    def grads(remat):
        model = random_model(config, seed=3, remat=remat)
        graphdef, state = nnx.split(model)

        @jax.jit
        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(ids, mask) ** 2)

        return jax.tree.leaves(jax.grad(loss)(state))

    base = grads(False)
    assert all(np.isfinite(np.asarray(g)).all() for g in base)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in base)
    for a, b in zip(grads(True), base):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # a named policy traces (compiling it too would only re-test jax.checkpoint)
    model = random_model(config, remat="dots_saveable")
    graphdef, state = nnx.split(model)
    shapes = jax.eval_shape(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids, mask))), state)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="remat='sometimes'"):
        Transformer(config, remat="sometimes")
