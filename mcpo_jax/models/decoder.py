"""Flax NNX Llama / Mistral decoder.

The per-layer weights are stacked on a leading "layers" axis and the trunk is one
`jax.lax.scan` over that axis: a 32-layer model compiles one layer body, not 32 copies. The
layer body is a pure function of one layer's weight slice, which keeps `jax.checkpoint`
(remat) and the scan free of NNX graph bookkeeping (no nnx.scan / split-merge per step).

Weight layout (shapes without the leading layer axis L), chosen so that every einsum
contracts named dimensions and heads stay a separate axis for tensor parallelism:

    attn_norm, mlp_norm   [D]            ("norm",)
    q_proj                [D, H, hd]     ("embed", "heads", "head_dim")
    k_proj, v_proj        [D, K, hd]     ("embed", "kv_heads", "head_dim")
    o_proj                [H, hd, D]     ("heads", "head_dim", "embed")
    q_bias / k_bias / v_bias [H|K, hd], o_bias [D]   (attention_bias)
    gate_proj, up_proj    [D, F]         ("embed", "mlp")
    down_proj             [F, D]         ("mlp", "embed")
    gate_bias, up_bias [F], down_bias [D]             (mlp_bias)
    embed                 [V, D]         ("vocab", "embed")
    lm_head               [D, V]         ("embed", "vocab")   (absent when tied)
    final_norm            [D]            ("norm",)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mcpo_jax import sharding as shd

from .config import ModelConfig

Dtype = Any
log = logging.getLogger(__name__)

# The tensors of one layer the backward needs when no matmul is recomputed (`checkpoint_name` tags in the
# layer body): the roped q and k, v, the attention output (cuDNN's own residuals, and o_proj's input), the
# residual stream after attention (mlp_norm's input) and the MLP's gate and up. The layer input comes with
# the scan; the RMSNorms, RoPE and SiLU(gate)·up are recomputed from these (elementwise, no matmul).
LAYER_SAVED_NAMES = ("q", "k", "v", "attn_out", "x_mid", "gate", "up")

# With "minimal_offload", the MLP's saved tensors (its input and the gate / up projections: at 8B 65 of the 94 kB
# per token per layer) go to the host's pinned memory in the forward and come back for the backward: no FLOP
# recomputed, their HBM traded for host transfers (GPU / TPU; a CPU program keeps them where they are).
OFFLOADED_NAMES = ("x_mid", "gate", "up")

REMAT_POLICIES = {
    # keep only LAYER_SAVED_NAMES: about a third of what a plain scan saves (bf16 1B: 51 kB per token per layer
    # against 142 kB), for elementwise recomputation only. The layer is checkpointed in two pieces around
    # attention (see `Transformer.layer_body`), so attention keeps its own residuals and is not run again.
    "minimal": jax.checkpoint_policies.save_only_these_names(*LAYER_SAVED_NAMES),
    "minimal_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[n for n in LAYER_SAVED_NAMES if n not in OFFLOADED_NAMES],
        names_which_can_be_offloaded=list(OFFLOADED_NAMES), offload_src="device", offload_dst="pinned_host"),
    "full": None,  # save nothing, recompute the whole layer
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
# The policies applied to the layer's two halves around attention (`Transformer.layer_body`).
SPLIT_REMAT = ("minimal", "minimal_offload")
# `remat="auto"` (the trainer's, `training.program`): the first of these whose compiled step fits the device,
# cheapest first: no recomputation; the MLP's saved tensors on the host (GPU / TPU only); every layer recomputed
# (+ one forward of the trained rows).
AUTO_REMAT = ("minimal", "minimal_offload", True)


# ------------------------------------------------------------------------------------------
# Layer weight specification: name -> (shape, logical axes, initializer kind, condition)
# ------------------------------------------------------------------------------------------


def layer_param_specs(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Per-layer weights (without the leading layer axis): name -> (shape, axes, init kind)."""
    D, H, K, hd, F = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ((D,), ("norm",), "ones"),
        "q_proj": ((D, H, hd), ("embed", "heads", "head_dim"), "normal"),
        "k_proj": ((D, K, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_proj": ((D, K, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_proj": ((H, hd, D), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((D,), ("norm",), "ones"),
        "gate_proj": ((D, F), ("embed", "mlp"), "normal"),
        "up_proj": ((D, F), ("embed", "mlp"), "normal"),
        "down_proj": ((F, D), ("mlp", "embed"), "normal"),
    }
    if c.attention_bias:
        specs["q_bias"] = ((H, hd), ("heads", "head_dim"), "zeros")
        specs["k_bias"] = ((K, hd), ("kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = ((K, hd), ("kv_heads", "head_dim"), "zeros")
        specs["o_bias"] = ((D,), ("norm",), "zeros")
    if c.mlp_bias:
        specs["gate_bias"] = ((F,), ("mlp",), "zeros")
        specs["up_bias"] = ((F,), ("mlp",), "zeros")
        specs["down_bias"] = ((D,), ("norm",), "zeros")
    return specs


def _make_param(key, shape, axes, kind, param_dtype, std=0.02) -> nnx.Param:
    if kind == "ones":
        value = jnp.ones(shape, param_dtype)
    elif kind == "zeros":
        value = jnp.zeros(shape, param_dtype)
    else:
        value = (std * jax.random.normal(key, shape, jnp.float32)).astype(param_dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading "layers" axis."""

    def __init__(self, config: ModelConfig, *, param_dtype: Dtype, rngs: nnx.Rngs):
        L = config.num_hidden_layers
        for name, (shape, axes, kind) in layer_param_specs(config).items():
            setattr(self, name, _make_param(rngs.params(), (L, *shape), ("layers", *axes), kind, param_dtype))

    def stacked(self) -> dict[str, jax.Array]:
        return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Decoding cache: k, v [layers, B, S, kv_heads, head_dim]; pos [B, S] int32 (-1 = empty slot)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


# ------------------------------------------------------------------------------------------
# Pure building blocks
# ------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps, dtype):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(dtype) * weight.astype(dtype)


def _base_inv_freq(theta: float, dim: int):
    # float32 like transformers, so both sides rotate by the same angles
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_inv_freq(c: ModelConfig, positions=None):
    """Inverse frequencies [hd/2] (float32) for the config's rope_type.

    "dynamic" NTK scaling depends on the longest position in the call (as transformers does for a
    fresh forward): positions must then be given.
    """
    dim, theta, s = c.head_dim, c.rope_theta, c.rope_scaling
    rope_type = c.rope_type
    if rope_type == "default":
        return jnp.asarray(_base_inv_freq(theta, dim))
    if rope_type == "linear":
        return jnp.asarray(_base_inv_freq(theta, dim) / np.float32(s["factor"]))
    if rope_type == "llama3":
        inv = _base_inv_freq(theta, dim)
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return jnp.asarray(np.where(medium, smoothed, scaled).astype(np.float32))
    if rope_type == "dynamic":
        if positions is None:
            raise ValueError("dynamic RoPE needs the positions of the call")
        max_pos = c.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        factor = s["factor"]
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (base**exponent)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_cos_sin(c: ModelConfig, positions_BT, inv_freq=None):
    """cos, sin [B, T, hd] of the positions (`inv_freq`: the inverse frequencies when already computed)."""
    inv = rope_inv_freq(c, positions_BT) if inv_freq is None else inv_freq
    angles = positions_BT.astype(jnp.float32)[..., None] * inv  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _prompt_positions(prompt_len_B, P):
    """[B, P]: 0..len-1, padding repeating the last real position (as `hidden_states` numbers right padding)."""
    return jnp.minimum(jnp.arange(P, dtype=jnp.int32)[None], jnp.maximum(prompt_len_B - 1, 0)[:, None])


def _completion_positions(prompt_len_B, completion_len_BK, W):
    """[B, K, W]: the completion's positions after its prompt, padding repeating the last real one."""
    j = jnp.arange(W, dtype=jnp.int32)
    return prompt_len_B[:, None, None] + jnp.minimum(j, jnp.maximum(completion_len_BK - 1, 0)[..., None])


def _per_row(x_B, K):
    """[B, ...] -> [B * K, ...]: each example's prompt keys / values once per completion row."""
    return jnp.broadcast_to(x_B[:, None], (x_B.shape[0], K) + x_B.shape[1:]).reshape((-1,) + x_B.shape[1:])


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
    return out.astype(x_BTNH.dtype)


# Every time the model ran attention through XLA where cuDNN was wanted (GPU, bf16/fp16): the reason, once
# per distinct reason. The trainer copies `attention_fallbacks()` into the run's summary; the bench fails a
# GPU run whose program has no cuDNN call.
_ATTENTION_FALLBACKS: list[dict[str, str]] = []


def attention_fallbacks() -> list[dict[str, str]]:
    """The cuDNN-attention fallbacks of this process so far (empty: none)."""
    return [dict(r) for r in _ATTENTION_FALLBACKS]


def record_attention_fallback(reason: str, *, kernel: str = "cuDNN", **details) -> None:
    """Say loudly, once per reason, that attention falls back to XLA where a fused kernel was wanted (cuDNN on a
    GPU in half precision, Pallas splash on a TPU): XLA's attention stores float32 [B, H, T, T] scores, at 8B and
    1024 tokens tens of GB and often OOM."""
    record = {"reason": str(reason), "kernel": kernel, **{k: str(v) for k, v in details.items()}}
    if any(r["reason"] == record["reason"] for r in _ATTENTION_FALLBACKS):
        return
    _ATTENTION_FALLBACKS.append(record)
    log.warning("!!! %s attention NOT used, falling back to XLA attention (slower, float32 T x T scores "
                "in memory): %s %s", kernel, reason, {k: v for k, v in record.items() if k != "reason"})


_KERNEL_NAMES = {"cudnn": "cuDNN", "splash": "splash"}


def _attention_impl(dtype, head_dim, platform: str | None = None) -> str:
    """The attention kernel for the devices a program targets (`platform`: their platform, default the host's):
    Pallas splash attention on TPU, cuDNN flash attention on GPU in half precision, XLA otherwise."""
    platform = platform or jax.devices()[0].platform
    if platform == "tpu":
        return "splash"
    if platform != "gpu":
        return "xla"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "xla"
    if head_dim > 128 or head_dim % 8:
        record_attention_fallback(f"head_dim {head_dim} is not a multiple of 8 up to 128", dtype=jnp.dtype(dtype))
        return "xla"
    return "cudnn"


def _never_save_gathered(policy):
    """`policy` (None: save everything), except the weights gathered for compute (`sharding.Layout.gather`) and
    sharding constraints' outputs: a layer's backward gathers its weights again from the sharded stack instead of
    keeping every layer's full weights."""
    from jax._src import ad_checkpoint, pjit

    def keep(prim, *args, **params):
        if prim is pjit.sharding_constraint_p:
            return False
        if prim is ad_checkpoint.name_p and params.get("name") == shd.GATHERED_WEIGHT:
            return False
        return True if policy is None else policy(prim, *args, **params)

    return keep


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


class Transformer(nnx.Module):
    """Llama / Mistral causal LM.

    Args:
      config: the ModelConfig.
      dtype: compute dtype (activations, matmul inputs); logits are always float32.
      param_dtype: storage dtype of the weights.
      remat: False, True (recompute each layer in the backward pass) or a policy name from
        REMAT_POLICIES.
      attention_impl: None (auto, from the devices the program targets: Pallas splash attention on TPU, cuDNN
        on GPU in bf16/fp16, XLA otherwise), "xla", "cudnn", "splash" (on a CPU: Pallas interpret mode, for
        tests), or a callable `(q, k, v, lengths, scale, window) -> out` (the compile-only audit's stand-in,
        `mcpo_jax.audit`; for the completions of `prefix_hidden_states`, `lengths` is the boolean mask
        [B, 1, T, S] instead). The fused paths assume right padding (`attention_mask` a prefix of ones per row).
      layout: where activations live (`sharding.Layout`: the mesh and the logical-axis rules that place the
        parameters): rows on the batch axes, each layer's weights gathered where used (FSDP), heads / MLP on
        the tensor axis; fused attention kernels run per device. None: one device (or GSPMD's own choices).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        remat: bool | str = False,
        attention_impl: str | None = None,
        layout: shd.Layout | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if remat not in (False, True) and remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: use False, True or one of {sorted(REMAT_POLICIES)}")
        if attention_impl not in (None, "xla", "cudnn", "splash") and not callable(attention_impl):
            raise ValueError(f"attention_impl={attention_impl!r}: use None, 'xla', 'cudnn' or 'splash'")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        self.attention_impl = attention_impl
        self.layout = layout
        c = config
        self.embed = _make_param(rngs.params(), (c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal", param_dtype)
        self.layers = DecoderLayers(c, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = _make_param(None, (c.hidden_size,), ("norm",), "ones", param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _make_param(
                rngs.params(), (c.hidden_size, c.vocab_size), ("embed", "vocab"), "normal", param_dtype
            )

    # -- public API ------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None):
        """Logits [B, T, V] (float32)."""
        hidden_BTD = self.hidden_states(input_ids, attention_mask)
        logits = jnp.einsum("btd,dv->btv", hidden_BTD, self.lm_head_kernel(), preferred_element_type=jnp.float32)
        return self._act(logits.astype(jnp.float32), "batch", None, "vocab")

    def lm_head_kernel(self):
        """The LM head [D, V] in compute dtype (the embedding transposed when tied), gathered for compute."""
        if self.config.tie_word_embeddings:
            head = self.embed[...].T.astype(self.dtype)
        else:
            head = self.lm_head[...].astype(self.dtype)
        return head if self.layout is None else self.layout.gather(head, ("embed", "vocab"))

    @property
    def platform(self) -> str:
        """The platform of the devices this model's programs are compiled for (the layout's mesh, else the host)."""
        return self.layout.platform if self.layout is not None else jax.devices()[0].platform

    def hidden_states(self, input_ids, attention_mask=None):
        """Final-norm output [B, T, D] in compute dtype (the trunk, without the LM head)."""
        c = self.config
        ids_BT = self._act(jnp.asarray(input_ids, jnp.int32), "batch", None)
        B, T = ids_BT.shape
        if attention_mask is None:
            mask_BT = None
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        else:
            mask_BT = self._act(jnp.asarray(attention_mask).astype(bool), "batch", None)
            positions_BT = jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1, 0)
        x_BTD = self._embed(ids_BT)
        x_BTD, _ = jax.lax.scan(self.layer_body(mask_BT, positions_BT), x_BTD, self.layers.stacked())
        return self._final_norm(x_BTD)

    def prefix_hidden_states(self, prompt_ids, prompt_lengths, completion_ids, completion_lengths):
        """The prompt encoded once per example, each of its K completions attending to the prompt's keys.

        prompt_ids [B, P] (right padded; prompt_lengths [B], at least 1 real token each), completion_ids
        [B, K, W] (right padded; completion_lengths [B, K]). Returns the final-norm hidden states of the prompt
        [B, P, D] and of the completions [B, K, W, D]: the same values as `hidden_states` of each row
        `prompt + completion` at those positions (RoPE positions continue after the prompt), for a trunk that
        runs the prompt's tokens once instead of K times. (`encode_prompt` then `encode_completions` compute the
        same in two scans, for a prompt encoding reused by several passes.)
        """
        c = self.config
        p_ids_BP = self._act(jnp.asarray(prompt_ids, jnp.int32), "batch", None)
        c_ids_BKW = jnp.asarray(completion_ids, jnp.int32)
        B, P = p_ids_BP.shape
        _, K, W = c_ids_BKW.shape
        p_len_B = jnp.asarray(prompt_lengths, jnp.int32)
        p_pos_BP = _prompt_positions(p_len_B, P)
        c_pos_NW = _completion_positions(p_len_B, jnp.asarray(completion_lengths, jnp.int32), W).reshape(B * K, W)
        # dynamic NTK RoPE depends on the longest position of the call: both streams use the whole call's
        inv = rope_inv_freq(c, jnp.concatenate([p_pos_BP.ravel(), c_pos_NW.ravel()]))
        # Each example's tokens side by side, [B, P + K*W]: prompt, then its completions. The layer's token-wise
        # halves (norms, projections, RoPE, MLP) run once over both streams, so each layer's weights are used (and,
        # under FSDP, gathered) once; the example axis stays where the batch is split.
        cos_BS, sin_BS = (jnp.concatenate([a, b.reshape(B, K * W, -1)], axis=1)
                          for a, b in zip(rope_cos_sin(c, p_pos_BP, inv), rope_cos_sin(c, c_pos_NW, inv)))
        attend_prompt = self._forward_attention(jnp.arange(P, dtype=jnp.int32)[None] < p_len_B[:, None], P)
        attend_completion = self._prefix_attention(p_len_B, K, P, W)
        prompt_part = lambda t_BS: t_BS[:, :P]
        completion_part = lambda t_BS: t_BS[:, P:].reshape((B * K, W) + t_BS.shape[2:])
        # the two attention outputs joined inside the MLP half: its backward keeps them as attention does (one
        # buffer each), not a joined copy besides
        join = lambda out_p, out_c: jnp.concatenate([out_p, out_c.reshape((B, K * W) + out_c.shape[2:])], axis=1)
        qkv, out_and_mlp, wrap = self._layer_pieces(join)

        # One scan over the layers for both streams: each layer's parameter gradient is summed inside the layer
        # (two scans would each produce a parameter-sized gradient stack, added at the end).
        def body(x_BSD, p):
            q, k, v = qkv(p, x_BSD, cos_BS, sin_BS)
            kp, vp = prompt_part(k), prompt_part(v)
            out_p = checkpoint_name(attend_prompt(prompt_part(q), kp, vp), "attn_out")
            out_c = checkpoint_name(attend_completion(completion_part(q), kp, vp, completion_part(k),
                                                      completion_part(v)), "attn_out")
            return out_and_mlp(p, x_BSD, out_p, out_c), None

        x_BSD = jnp.concatenate([self._embed(p_ids_BP), self._embed(c_ids_BKW.reshape(B, K * W))], axis=1)
        x_BSD, _ = jax.lax.scan(wrap(body), x_BSD, self.layers.stacked())
        x_BSD = self._final_norm(x_BSD)
        return prompt_part(x_BSD), x_BSD[:, P:].reshape(B, K, W, -1)

    def encode_prompt(self, prompt_ids, prompt_lengths, *, inv_freq=None):
        """The prompts alone (right padded, [B, P]): final-norm hidden states [B, P, D] and every layer's roped
        keys and values [layers, B, P, kv_heads, head_dim] for `encode_completions`. `inv_freq`: RoPE's
        inverse frequencies of the whole call (needed for dynamic NTK RoPE, see `prefix_hidden_states`)."""
        c = self.config
        p_ids_BP = self._act(jnp.asarray(prompt_ids, jnp.int32), "batch", None)
        B, P = p_ids_BP.shape
        p_len_B = jnp.asarray(prompt_lengths, jnp.int32)
        positions_BP = _prompt_positions(p_len_B, P)
        cos, sin = rope_cos_sin(c, positions_BP, inv_freq)
        attend = self._forward_attention(jnp.arange(P, dtype=jnp.int32)[None] < p_len_B[:, None], P)
        qkv, out_and_mlp, wrap = self._layer_pieces()

        def body(x_BPD, p):
            q, k, v = qkv(p, x_BPD, cos, sin)
            out = checkpoint_name(attend(q, k, v), "attn_out")
            return out_and_mlp(p, x_BPD, out), (k, v)

        x_BPD, (k_LBPKH, v_LBPKH) = jax.lax.scan(wrap(body), self._embed(p_ids_BP), self.layers.stacked())
        return self._final_norm(x_BPD), k_LBPKH, v_LBPKH

    def encode_completions(self, prompt_k, prompt_v, prompt_lengths, completion_ids, completion_lengths, *,
                           inv_freq=None):
        """Completions [B, K, W] (right padded) after their example's prompt, given the prompt's keys and values
        from `encode_prompt`: final-norm hidden states [B, K, W, D]. Attention runs over [prompt keys | own
        keys] with an explicit mask (prompt padding, causality, sliding window)."""
        c = self.config
        c_ids_BKW = jnp.asarray(completion_ids, jnp.int32)
        B, K, W = c_ids_BKW.shape
        P = prompt_k.shape[2]
        p_len_B = jnp.asarray(prompt_lengths, jnp.int32)
        positions_NW = _completion_positions(p_len_B, jnp.asarray(completion_lengths, jnp.int32), W).reshape(B * K, W)
        cos, sin = rope_cos_sin(c, positions_NW, inv_freq)
        attend = self._prefix_attention(p_len_B, K, P, W)
        qkv, out_and_mlp, wrap = self._layer_pieces()

        def body(x_NWD, xs):
            p, kp, vp = xs
            q, k, v = qkv(p, x_NWD, cos, sin)
            out = checkpoint_name(attend(q, kp.astype(k.dtype), vp.astype(v.dtype), k, v), "attn_out")
            return out_and_mlp(p, x_NWD, out), None

        x_NWD = self._embed(c_ids_BKW.reshape(B * K, W))
        x_NWD, _ = jax.lax.scan(wrap(body), x_NWD, (self.layers.stacked(), prompt_k, prompt_v))
        return self._final_norm(x_NWD).reshape(B, K, W, -1)

    def _layer_pieces(self, join=None):
        """(qkv, out_and_mlp, wrap): the layer's two halves and how to wrap the scanned body, per the remat
        setting. With a split policy ("minimal", "minimal_offload") the halves are checkpointed around attention:
        a custom_vjp attention (cuDNN, splash) inside a checkpoint is recomputed in the backward whatever the
        policy; outside, it keeps its own residuals (q, k, v, output, softmax statistics) and runs once, and the
        halves recompute only RMSNorm, RoPE and SiLU·up. `join`: out_and_mlp takes several attention outputs and
        joins them first (`join(*outs)`), inside its checkpoint."""
        out_and_mlp = self._out_and_mlp
        if join is not None:
            out_and_mlp = lambda p, x, *outs: self._out_and_mlp(p, x, join(*outs))
        if self.remat in SPLIT_REMAT:
            policy = REMAT_POLICIES[self.remat]
            return (jax.checkpoint(self._qkv, policy=policy, prevent_cse=False),
                    jax.checkpoint(out_and_mlp, policy=policy, prevent_cse=False), lambda f: f)
        return self._qkv, out_and_mlp, self._maybe_remat

    def layer_body(self, mask_BT, positions_BT):
        """The scanned body `(x_BTD, layer_params) -> (x_BTD, None)`, remat policy applied (the audit
        reads what its backward saves)."""
        cos, sin = rope_cos_sin(self.config, positions_BT)
        attend = self._forward_attention(mask_BT, positions_BT.shape[1])
        qkv, out_and_mlp, wrap = self._layer_pieces()

        def body(x_BTD, p):
            q, k, v = qkv(p, x_BTD, cos, sin)
            return out_and_mlp(p, x_BTD, checkpoint_name(attend(q, k, v), "attn_out")), None

        return wrap(body)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
        """Empty KV cache with `max_length` slots per row."""
        c = self.config
        shape = (c.num_hidden_layers, batch_size, max_length, c.num_key_value_heads, c.head_dim)
        dtype = dtype or self.dtype
        return KVCache(
            k=self._act(jnp.zeros(shape, dtype), None, "batch", None, "kv_heads", None),
            v=self._act(jnp.zeros(shape, dtype), None, "batch", None, "kv_heads", None),
            pos=self._act(jnp.full((batch_size, max_length), -1, jnp.int32), "batch", None),
        )

    def decode(self, input_ids, positions, cache: KVCache, cache_index):
        """Run t new tokens against the cache: returns (logits [B, t, V] float32, new cache).

        The tokens' k/v are written at slots cache_index .. cache_index+t-1; a token whose
        position is -1 is padding (stored as an empty slot, its logits are meaningless). Each
        query attends to the filled slots whose position is <= its own (and, with a sliding
        window, within the window).
        """
        c = self.config
        ids_Bt = self._act(jnp.asarray(input_ids, jnp.int32), "batch", None)
        pos_Bt = jnp.asarray(positions, jnp.int32)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        pos_BS = jax.lax.dynamic_update_slice(cache.pos, pos_Bt, (jnp.int32(0), cache_index))
        q_pos = pos_Bt[:, :, None]
        k_pos = pos_BS[:, None, :]
        allowed_BtS = (k_pos >= 0) & (q_pos >= 0) & (k_pos <= q_pos)
        if c.sliding_window is not None:
            allowed_BtS &= q_pos - k_pos < c.sliding_window
        mask = allowed_BtS[:, None, :, :]
        cos, sin = rope_cos_sin(c, jnp.maximum(pos_Bt, 0))
        zero = jnp.int32(0)

        def body(x_BtD, xs):
            p, k_cache, v_cache = xs
            q, k, v = self._qkv(p, x_BtD, cos, sin)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (zero, cache_index, zero, zero))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (zero, cache_index, zero, zero))
            k_cache = self._act(k_cache, "batch", None, "kv_heads", None)
            v_cache = self._act(v_cache, "batch", None, "kv_heads", None)
            out = jax.nn.dot_product_attention(
                q,
                k_cache.astype(q.dtype),
                v_cache.astype(q.dtype),
                mask=mask,
                scale=c.head_dim**-0.5,
                implementation="xla",
            )
            return self._out_and_mlp(p, x_BtD, out), (k_cache, v_cache)

        x = self._embed(ids_Bt)
        x, (k_new, v_new) = jax.lax.scan(body, x, (self.layers.stacked(), cache.k, cache.v))
        hidden = self._final_norm(x)
        logits = jnp.einsum("btd,dv->btv", hidden, self.lm_head_kernel(), preferred_element_type=jnp.float32)
        logits = self._act(logits.astype(jnp.float32), "batch", None, "vocab")
        return logits, KVCache(k=k_new, v=v_new, pos=pos_BS)

    # -- internals -------------------------------------------------------------------------

    def _act(self, x, *axes):
        """An activation placed by its dimensions' logical names (`sharding.Layout.constrain`)."""
        return x if self.layout is None else self.layout.constrain(x, axes)

    def _weight(self, p, name):
        """Layer weight `name` of the layer slice `p`, in compute dtype, gathered where used (FSDP)."""
        w = p[name].astype(self.dtype)
        if self.layout is None:
            return w
        return self.layout.gather(w, layer_param_specs(self.config)[name][1])

    def _embed(self, ids):
        """Token embeddings [..., D] in compute dtype, rows on the batch axes."""
        x = self.embed[...].astype(self.dtype)[ids]
        return self._act(x, "batch", *([None] * (x.ndim - 1)))

    def _final_norm(self, x):
        return self._act(rms_norm(x, self.final_norm[...], self.config.rms_norm_eps, self.dtype),
                         "batch", *([None] * (x.ndim - 1)))

    def _maybe_remat(self, body: Callable) -> Callable:
        if self.remat is False and (self.layout is None or self.layout.trivial):
            return body
        if self.remat is True:
            policy = None
        else:  # a gathered weight is never kept for the backward, whatever the policy
            policy = _never_save_gathered(None if self.remat is False else REMAT_POLICIES[self.remat])
        return jax.checkpoint(body, policy=policy, prevent_cse=False)

    def _impl(self):
        return self.attention_impl or _attention_impl(self.dtype, self.config.head_dim, self.platform)

    def _per_device(self, fn, *args, heads: tuple[bool, ...]):
        """`fn(*args)` on each device's rows and heads (`jax.shard_map`): XLA cannot partition a fused attention
        kernel (cuDNN's asks for identically sharded q, k and v; a Pallas call none at all). `heads[i]`: whether
        dimension 2 of args[i] is a heads dimension (q, k, v), split over the tensor axis when both the query and
        the kv heads divide by it."""
        layout = self.layout
        if layout is None or layout.trivial:
            return fn(*args)
        q, k = args[0], args[1]
        rows = layout.spec(("batch",), (q.shape[0],))[0]
        head = layout.shared_axis("heads", q.shape[2], k.shape[2])

        def spec(x, is_heads):
            entries = [rows] + [None] * (x.ndim - 1)
            if is_heads:
                entries[2] = head
            return jax.sharding.PartitionSpec(*entries)

        specs = tuple(spec(x, h) for x, h in zip(args, heads))
        return jax.shard_map(fn, mesh=layout.mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)

    def _splash(self, q, k, v, kv_valid_NS, causal_offset, window, scale):
        from .splash import splash_attention

        layout = self.layout
        mesh, rows, head = None, (), None
        if layout is not None and not layout.trivial:
            mesh = layout.mesh
            entry = layout.spec(("batch",), (q.shape[0],))[0]
            rows = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            head = layout.shared_axis("heads", q.shape[2], k.shape[2])
        return splash_attention(q, k, v, kv_valid_NS=kv_valid_NS, causal_offset=causal_offset, window=window,
                                scale=scale, mesh=mesh, batch_axes=rows, head_axis=head,
                                interpret=self.platform != "tpu")

    def _fused_or_xla(self, impl: str, fused, xla, q, *, prefix: bool = False):
        """`fused()` (the kernel `impl`: "cudnn" or "splash"), or where the kernel refuses the call (shape, dtype,
        chip), `xla()` with the reason recorded loudly (`record_attention_fallback`), never silently; a kernel
        asked for by name (`attention_impl`) raises instead."""
        try:
            return fused()
        except (NotImplementedError, ValueError, RuntimeError) as e:
            if self.attention_impl == impl:
                raise
            record_attention_fallback(f"{'prompt-prefix attention: ' if prefix else ''}{type(e).__name__}: {e}",
                                      kernel=_KERNEL_NAMES[impl], q_shape=q.shape, dtype=q.dtype)
            return xla()

    def _forward_attention(self, mask_BT, T):
        """`attend(q [N, T, H, hd], k, v [N, T, K, hd])` for right-padded rows: causal, padding keys masked,
        sliding window."""
        c = self.config
        impl = self._impl()
        scale = c.head_dim**-0.5
        window = c.sliding_window if c.sliding_window is not None and c.sliding_window < T else None
        lengths = None if mask_BT is None else jnp.sum(mask_BT, axis=1, dtype=jnp.int32)
        if callable(impl):
            return lambda q, k, v: impl(q, k, v, lengths, scale, window)
        xla_attend = self._xla_attention(mask_BT, T, window, scale)
        if impl == "splash":
            def splash(q, k, v):
                valid = jnp.ones(q.shape[:2], bool) if mask_BT is None else mask_BT
                return self._fused_or_xla("splash", lambda: self._splash(q, k, v, valid, 0, window, scale),
                                          lambda: xla_attend(q, k, v), q)

            return splash
        if impl != "cudnn":
            return xla_attend
        # right padding: padding keys are exactly those past each row's length
        local = None if window is None else (window - 1, 0)

        def cudnn(q, k, v, *lengths_N):
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths_N[0] if lengths_N else None,
                local_window_size=local, implementation="cudnn")

        def attend(q, k, v):
            extra = () if lengths is None else (lengths,)
            return self._fused_or_xla(
                "cudnn", lambda: self._per_device(cudnn, q, k, v, *extra, heads=(True, True, True, False)),
                lambda: xla_attend(q, k, v), q)

        return attend

    def _prefix_attention(self, prompt_len_B, K, P, W):
        """`attend(q [B*K, W, ...], kp, vp [B, P, ...], kc, vc [B*K, W, ...])` for completions over [prompt keys |
        own keys]: a prompt key is visible when it is real (j < the prompt's length), an own key when causal;
        with a sliding window, when within the window of the query's absolute position."""
        c = self.config
        impl = self._impl()
        scale = c.head_dim**-0.5
        i_W1 = jnp.arange(W, dtype=jnp.int32)[:, None]
        j_P = jnp.arange(P, dtype=jnp.int32)[None]
        p_len_N = jnp.repeat(prompt_len_B, K)
        p_len_N11 = p_len_N[:, None, None]
        prompt_ok = j_P[None] < p_len_N11  # [N, 1, P]
        own_ok = jnp.arange(W, dtype=jnp.int32)[None] <= i_W1  # [W, W]
        if c.sliding_window is not None:
            prompt_ok = prompt_ok & ((p_len_N11 + i_W1[None]) - j_P[None] < c.sliding_window)
            own_ok = own_ok & (i_W1 - jnp.arange(W, dtype=jnp.int32)[None] < c.sliding_window)
        n = prompt_ok.shape[0]
        allowed = jnp.concatenate([jnp.broadcast_to(prompt_ok, (n, W, P)),
                                   jnp.broadcast_to(own_ok[None], (n, W, W))], axis=2)[:, None]  # [N, 1, W, P+W]
        allowed = self._act(allowed, "batch", None, None, None)

        def keys(kp, vp, kc, vc):  # [prompt keys | own keys] per row
            k = jnp.concatenate([_per_row(kp, K), kc], axis=1)
            v = jnp.concatenate([_per_row(vp, K), vc], axis=1)
            return self._act(k, "batch", None, "kv_heads", None), self._act(v, "batch", None, "kv_heads", None)

        if callable(impl):
            return lambda q, kp, vp, kc, vc: impl(q, *keys(kp, vp, kc, vc), allowed, scale, None)

        def xla(q, kp, vp, kc, vc):
            k, v = keys(kp, vp, kc, vc)
            return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale, implementation="xla")

        if impl == "splash":
            window = c.sliding_window if c.sliding_window is not None and c.sliding_window < P + W else None
            if window is None:
                kv_valid = jnp.concatenate([j_P < p_len_N[:, None], jnp.ones((n, W), bool)], axis=1)
                roll = None
            else:
                # each prompt's keys moved right so that its last real key sits in column P - 1: array distance is
                # then position distance, and the kernel's static window applies as it is
                kv_valid = jnp.concatenate([j_P >= P - p_len_N[:, None], jnp.ones((n, W), bool)], axis=1)
                roll = ((j_P + prompt_len_B[:, None]) % P)[:, :, None, None]  # [B, P, 1, 1] source of each column

            def splash(q, kp, vp, kc, vc):
                def fused():
                    kp_, vp_ = kp, vp
                    if roll is not None:
                        kp_, vp_ = jnp.take_along_axis(kp, roll, axis=1), jnp.take_along_axis(vp, roll, axis=1)
                    return self._splash(q, *keys(kp_, vp_, kc, vc), kv_valid, P, window, scale)

                return self._fused_or_xla("splash", fused, lambda: xla(q, kp, vp, kc, vc), q, prefix=True)

            return splash
        if impl != "cudnn":
            return xla

        def cudnn(q, k, v, mask):  # cuDNN flash attention with the mask as an additive bias
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")

        def attend(q, kp, vp, kc, vc):
            k, v = keys(kp, vp, kc, vc)
            return self._fused_or_xla(
                "cudnn", lambda: self._per_device(cudnn, q, k, v, allowed, heads=(True, True, True, False)),
                lambda: jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale, implementation="xla"),
                q, prefix=True)

        return attend

    def _xla_attention(self, mask_BT, T, window, scale):
        idx = jnp.arange(T)
        allowed_TS = idx[None, :] <= idx[:, None]
        if window is not None:
            allowed_TS &= idx[:, None] - idx[None, :] < window
        allowed = allowed_TS[None, None]
        if mask_BT is not None:
            allowed = self._act(allowed & mask_BT[:, None, None, :], "batch", None, None, None)

        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale, implementation="xla")

        return attend

    def _qkv(self, p, x_BTD, cos, sin):
        c, dt = self.config, self.dtype
        w = lambda name: self._weight(p, name)
        h = rms_norm(x_BTD, w("attn_norm"), c.rms_norm_eps, dt)
        q = jnp.einsum("btd,dnh->btnh", h, w("q_proj"))
        k = jnp.einsum("btd,dkh->btkh", h, w("k_proj"))
        v = jnp.einsum("btd,dkh->btkh", h, w("v_proj"))
        if c.attention_bias:
            q = q + w("q_bias")
            k = k + w("k_bias")
            v = v + w("v_bias")
        q = self._act(apply_rope(q, cos, sin), "batch", None, "heads", None)
        k = self._act(apply_rope(k, cos, sin), "batch", None, "kv_heads", None)
        v = self._act(v, "batch", None, "kv_heads", None)
        return checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")

    def _out_and_mlp(self, p, x_BTD, attn_BTNH):
        c, dt = self.config, self.dtype
        w = lambda name: self._weight(p, name)
        attn_BTNH = self._act(attn_BTNH.astype(dt), "batch", None, "heads", None)
        o = jnp.einsum("btnh,nhd->btd", attn_BTNH, w("o_proj"))
        if c.attention_bias:
            o = o + w("o_bias")
        x_BTD = checkpoint_name(self._act(x_BTD + o, "batch", None, None), "x_mid")
        h = rms_norm(x_BTD, w("mlp_norm"), c.rms_norm_eps, dt)
        gate = jnp.einsum("btd,df->btf", h, w("gate_proj"))
        up = jnp.einsum("btd,df->btf", h, w("up_proj"))
        if c.mlp_bias:
            gate = gate + w("gate_bias")
            up = up + w("up_bias")
        gate = checkpoint_name(self._act(gate, "batch", None, "mlp"), "gate")
        up = checkpoint_name(self._act(up, "batch", None, "mlp"), "up")
        down = jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w("down_proj"))
        if c.mlp_bias:
            down = down + w("down_bias")
        return self._act(x_BTD + down, "batch", None, None)


def gather_weights(model: Transformer) -> Transformer:
    """The model with its weights in compute dtype, gathered over the FSDP axes once (tensor-parallel splits kept):
    each device then holds the whole model for a program that runs it many times over few tokens (generation,
    where every decoded token would otherwise all-gather every layer's weights again). A no-op without a
    multi-device layout. Inside a jitted function."""
    layout = model.layout
    if layout is None or layout.trivial:
        return model
    graphdef, state = nnx.split(model)
    axes = dict(nnx.to_flat_state(logical_axes(model)))
    flat = []
    for path, value in nnx.to_flat_state(state):
        axis_names = axes[path]
        axis_names = axis_names.get_value() if isinstance(axis_names, nnx.Variable) else axis_names
        array = value.get_value() if isinstance(value, nnx.Variable) else value
        gathered = layout.gather(array.astype(model.dtype), tuple(axis_names))
        flat.append((path, value.replace(gathered) if isinstance(value, nnx.Variable) else gathered))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def logical_axes(model: nnx.Module):
    """Logical axis names of every parameter: same tree as `nnx.state(model, nnx.Param)`, leaves
    are tuples of names ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm")."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(
        lambda v: tuple(v.get_metadata()["out_sharding"]), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
