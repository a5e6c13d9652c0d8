"""Tiny Llama / Mistral checkpoints and PyTorch references for the model tests."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpo_jax.models import ModelConfig, Transformer

# Parity cases: T = 16 > every window / original context below, so RoPE scaling and sliding windows are
# exercised.
HF_CONFIGS = {
    # (a) GQA (4 query heads, 2 kv heads), llama3 rope scaling, tied embeddings
    "llama_gqa_llama3_tied": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=131, hidden_size=32,
        intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8},
    ),
    # (b) untied, head_dim (24) != hidden/heads (8), attention + MLP biases, linear rope scaling
    "llama_untied_headdim_bias": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=131, hidden_size=32,
        intermediate_size=56, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=24,
        attention_bias=True, mlp_bias=True, max_position_embeddings=64, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    # (c) Mistral, sliding window 5 < T = 16
    "mistral_sliding": dict(
        model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=131, hidden_size=32,
        intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        sliding_window=5, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # dynamic NTK rope: max_position_embeddings 8 < T, so the frequencies are rescaled
    "llama_dynamic": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=131, hidden_size=32,
        intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
}

SEQ_LEN = 16
LENGTHS = (16, 11, 6)  # right-padded batch; the first row is full (dynamic rope sees the same max)


def batch(vocab_size: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, (len(LENGTHS), SEQ_LEN)).astype(np.int32)
    mask = (np.arange(SEQ_LEN)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def random_model(config: ModelConfig, seed: int = 0, **kwargs) -> Transformer:
    """A model whose every parameter is random and O(1)-relevant: norms 1+N(0,.2), biases N(0,.2),
    matrices N(0, 1/sqrt(fan_in)) so that each tensor (and each layout mistake) moves the logits."""
    model = nnx.eval_shape(lambda: Transformer(config, **kwargs))  # no init compile: numpy fills it
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = var.get_value()
        name = str(path[-1])
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if "norm" in name:
            value = 1.0 + 0.2 * noise
        elif "bias" in name:
            value = 0.2 * noise
        else:
            if name == "embed":
                fan_in = 1
            elif name == "lm_head":
                fan_in = x.shape[0]
            elif name == "o_proj":
                fan_in = x.shape[1] * x.shape[2]
            else:
                fan_in = x.shape[1]
            value = noise / np.sqrt(fan_in)
        var.set_value(jnp.asarray(value, x.dtype))
    return model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def valid_rel_err(ours_BTV, ref_BTV, mask_BT) -> float:
    """Worst per-row relative L2 error of the logits at valid (unpadded) positions."""
    m = np.asarray(mask_BT).astype(bool)
    return max(rel_err(np.asarray(ours_BTV)[b][m[b]], np.asarray(ref_BTV)[b][m[b]]) for b in range(m.shape[0]))


def torch_logits(folder: str, ids, mask):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def record(name: str, value: float):
    """Append a measured error to $MCPO_PARITY_LOG (if set) and print it (visible with -s)."""
    print(f"[parity] {name}: {value:.3e}")
    path = os.environ.get("MCPO_PARITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, "value": value}) + "\n")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def logits(model, ids, mask=None):
    """model(ids, mask) under jit (eager NNX calls retrace the layer scan on every call)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
