"""Batched sampling with the model's KV cache, in one jitted program.

``generate(model, input_ids, attention_mask, ...)`` prefills the prompt with ``model.decode`` (one call for all
but the last column, one for the last), then decodes one token per step inside a ``lax.while_loop`` that stops
when every row has produced EOS or ``max_new_tokens`` tokens. Prompts may be left- or right-padded: rows are
first rolled so that every prompt ends in the last column, positions come from the mask (``cumsum(mask) - 1``)
and padding tokens are stored as empty cache slots, so each row continues at its own position. Only the last
column's logits are used, so XLA drops the LM head of the rest: no [B, T, V] logits tensor is materialized.
The parameters go to the jitted function as they are (sharded on a mesh or not); nothing is copied.

Sampling: ``temperature`` 0 is greedy; otherwise logits / temperature, then top-k, then top-p (nucleus: the
smallest set of tokens whose probability reaches ``top_p``), then a categorical draw with
``fold_in(key, step)``. ``temperature``, ``top_p`` and ``top_k`` may be scalars or per-row arrays [B] (the
online loop samples K temperatures in one batch); they and the EOS ids are traced, so changing them does not
recompile (only switching top-k/top-p filtering on or off does).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpo_jax import sharding as shd


def _eos_tuple(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model config's (Llama 3 Instruct ends turns
    with <|eot_id|>, which only some of its files name as EOS)."""
    ids = []
    config = getattr(model, "config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def filter_logits(logits_BV, *, top_k_B, top_p_B):
    """Mask (to -inf) the tokens outside top-k (k = 0: all) and outside the top-p nucleus, per row."""
    vocab = logits_BV.shape[-1]
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth_B = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)
    sorted_BV = jnp.where(jnp.arange(vocab)[None] < k_B[:, None], sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # keep a token while the mass before it is < top_p: the smallest prefix reaching top_p, at least one token
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = before_BV < top_p_B[:, None]
    keep_BV = keep_BV.at[:, 0].set(True)
    cutoff_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
    threshold_B = jnp.maximum(cutoff_B, kth_B[:, 0])
    return jnp.where(logits_BV >= threshold_B[:, None], logits_BV, -jnp.inf)


def _align_left(ids_BT, mask_BT):
    """Roll each row so that its last real token sits in the last column (left padding).

    Right-padded (or any) prompts become left-padded; positions still follow the mask, so the model sees the
    same sequence. Every row's next token then goes to the same cache slot.
    """
    prompt_len = ids_BT.shape[1]
    last_B = prompt_len - 1 - jnp.argmax(mask_BT[:, ::-1], axis=-1)
    shift_B = prompt_len - 1 - last_B
    src_BT = (jnp.arange(prompt_len)[None, :] - shift_B[:, None]) % prompt_len
    return jnp.take_along_axis(ids_BT, src_BT, axis=1), jnp.take_along_axis(mask_BT, src_BT, axis=1)


def _sample(logits_BV, key, temperature_B, top_k_B, top_p_B, use_filter: bool):
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    if use_filter:
        scaled_BV = filter_logits(scaled_BV, top_k_B=top_k_B, top_p_B=top_p_B)
    sampled_B = jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature_B > 0, sampled_B, greedy_B)


MAX_EOS_IDS = 8  # EOS ids travel as a fixed-size traced array (-1 = unused), so changing them does not recompile


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "use_filter", "gather"))
def _generate_jit(graphdef, state, ids_BT, mask_BT, key, temperature_B, top_k_B, top_p_B, eos_E, *,
                  max_new_tokens: int, use_filter: bool, gather: bool = True):
    model = nnx.merge(graphdef, state)
    if gather:  # FSDP-sharded weights gathered once for the call, not per layer at every decoded token
        from mcpo_jax.models.decoder import gather_weights

        model = gather_weights(model)
    batch, prompt_len = ids_BT.shape
    ids_BT, mask_BT = _align_left(ids_BT.astype(jnp.int32), mask_BT.astype(jnp.int32))
    positions_BT = jnp.where(mask_BT > 0, jnp.cumsum(mask_BT, axis=-1) - 1, -1).astype(jnp.int32)
    lengths_B = mask_BT.sum(-1).astype(jnp.int32)

    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    if prompt_len > 1:
        # Prefill all but the last column; its logits are unused, so XLA drops the [B, T-1, V] LM head.
        _, cache = model.decode(ids_BT[:, :-1], positions_BT[:, :-1], cache, 0)
    logits_B1V, cache = model.decode(ids_BT[:, -1:], positions_BT[:, -1:], cache, prompt_len - 1)
    logits_BV = logits_B1V[:, 0]

    fill = jnp.maximum(eos_E[0], 0)  # the first EOS id, or 0 when there is none (no row ever stops then)
    out_BN = jnp.full((batch, max_new_tokens), fill, jnp.int32)

    def pick(step, logits_BV, done_B):
        token_B = _sample(logits_BV, jax.random.fold_in(key, step), temperature_B, top_k_B, top_p_B, use_filter)
        token_B = jnp.where(done_B, fill, token_B)
        now_done_B = done_B | jnp.any((token_B[:, None] == eos_E[None, :]) & (eos_E[None, :] >= 0), axis=-1)
        return token_B, now_done_B

    token_B, done_B = pick(0, logits_BV, jnp.zeros((batch,), bool))
    out_BN = out_BN.at[:, 0].set(token_B)

    def cond(carry):
        step, _, _, done_B, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        step, token_B, cache, done_B, out_BN = carry
        # token `step - 1` (already chosen) goes into the cache at slot T + step - 1, position length + step - 1
        positions_B1 = (lengths_B + step - 1)[:, None]
        logits_B1V, cache = model.decode(token_B[:, None], positions_B1, cache, prompt_len + step - 1)
        token_B, done_B = pick(step, logits_B1V[:, 0], done_B)
        out_BN = jax.lax.dynamic_update_slice(out_BN, token_B[:, None], (0, step))
        return step + 1, token_B, cache, done_B, out_BN

    carry = (jnp.asarray(1, jnp.int32), token_B, cache, done_B, out_BN)
    _, _, _, _, out_BN = jax.lax.while_loop(cond, body, carry)
    return out_BN


def _per_row(value, batch: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full((batch,), arr, dtype)
    if arr.shape != (batch,):
        raise ValueError(f"per-row sampling parameter has shape {arr.shape}; expected a scalar or ({batch},)")
    return arr


def _place_like_params(state, batch: int, *arrays):
    """Put the inputs on the parameters' mesh so that jit sees one device set: arrays with a leading batch
    axis are split over (data, fsdp) when the batch divides, the rest replicated."""
    leaves = jax.tree.leaves(state)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return tuple(jnp.asarray(a) for a in arrays)
    mesh = sharding.mesh
    split = shd.data_parallel_size(mesh) if set(shd.MESH_AXES) <= set(mesh.shape) else 1
    out = []
    for a in arrays:
        a = np.asarray(a)
        if split > 1 and a.ndim >= 1 and a.shape[0] == batch and batch % split == 0:
            placement = shd.batch_sharding(mesh, a.ndim)  # the rules table's "batch" axes
        else:
            placement = shd.replicated(mesh)
        out.append(jax.device_put(a, placement))
    return tuple(out)


def lower_generate(graphdef, abstract_state, mesh, *, batch_size: int, prompt_len: int, max_new_tokens: int,
                   use_filter: bool = False, gather_weights: bool = True):
    """The sampler's program (`generate`'s) lowered from shapes: `abstract_state` holds the model's parameters as
    ShapeDtypeStructs with their shardings on `mesh`; the inputs are placed as `generate` places them (split over the
    batch axes when `batch_size` divides, else replicated). Nothing is allocated (the compile-only check)."""
    split = shd.data_parallel_size(mesh)
    rows = shd.batch_sharding(mesh, 1) if split > 1 and batch_size % split == 0 else shd.replicated(mesh)
    rows2 = shd.batch_sharding(mesh, 2) if split > 1 and batch_size % split == 0 else shd.replicated(mesh)
    sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return _generate_jit.lower(
        graphdef, abstract_state, sds((batch_size, prompt_len), jnp.int32, rows2),
        sds((batch_size, prompt_len), jnp.int32, rows2), sds(key.shape, key.dtype, shd.replicated(mesh)),
        sds((batch_size,), jnp.float32, rows), sds((batch_size,), jnp.int32, rows),
        sds((batch_size,), jnp.float32, rows), sds((MAX_EOS_IDS,), jnp.int32, shd.replicated(mesh)),
        max_new_tokens=int(max_new_tokens), use_filter=bool(use_filter), gather=bool(gather_weights))


def to_host(x) -> np.ndarray:
    """A numpy copy of a generation result, gathered across processes when it spans several hosts."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, temperature=0.0, top_p=1.0,
             top_k=0, key=None, eos_id: int | Sequence[int] | None = None, gather_weights: bool = True):
    """Sample ``max_new_tokens`` tokens after each prompt. Returns int32 [B, max_new_tokens] (a jax.Array; on
    a mesh, split over the batch axes when B divides; :func:`to_host` gathers it across hosts).

    Args:
      model: an ``mcpo_jax.models.Transformer`` (anything with ``init_cache`` / ``decode``).
      input_ids, attention_mask: [B, T] prompts, left- or right-padded (mask 1 on real tokens).
      temperature: 0 = greedy; scalar or per-row [B].
      top_p: nucleus mass in (0, 1], scalar or [B]. top_k: 0 = off, scalar or [B].
      key: a ``jax.random`` key; required when any temperature > 0. Same key, same tokens.
      eos_id: int or several ints; a row stops at its first EOS and is padded with ``eos_id`` (the first one)
        after it. None: no stop, always ``max_new_tokens`` tokens.
      gather_weights: on a mesh whose layout splits the weights (FSDP), gather them once for the call (each
        device holds the whole model in compute dtype while it samples) instead of all-gathering every layer at
        every decoded token; False where the devices cannot hold the model beside what they keep.
    """
    input_ids = np.asarray(input_ids, np.int32) if not isinstance(input_ids, jax.Array) else input_ids
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = np.ones(input_ids.shape, np.int32)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    temperature_B = _per_row(temperature, batch, np.float32)
    top_p_B = _per_row(top_p, batch, np.float32)
    top_k_B = _per_row(top_k, batch, np.int32)
    if np.any(temperature_B < 0) or np.any((top_p_B <= 0) | (top_p_B > 1)) or np.any(top_k_B < 0):
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    if key is None:
        if np.any(temperature_B > 0):
            raise ValueError("sampling (temperature > 0) needs a jax.random key for reproducibility")
        key = jax.random.key(0)
    use_filter = bool(np.any(top_p_B < 1) or np.any(top_k_B > 0))
    eos = _eos_tuple(eos_id)
    if len(eos) > MAX_EOS_IDS:
        raise ValueError(f"at most {MAX_EOS_IDS} EOS ids, got {len(eos)}")
    eos_E = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos_E[:len(eos)] = eos
    graphdef, state = nnx.split(model)
    ids, mask, temperature_B, top_k_B, top_p_B, eos_E = _place_like_params(
        state, batch, input_ids, attention_mask, temperature_B, top_k_B, top_p_B, eos_E)
    return _generate_jit(graphdef, state, ids, mask, key, temperature_B, top_k_B, top_p_B, eos_E,
                         max_new_tokens=int(max_new_tokens), use_filter=use_filter, gather=bool(gather_weights))


def generate_texts(model, tokenizer, rows: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                   temperature=0.0, top_p: float = 1.0, seed: int = 0, width: int | None = None,
                   multiple: int = 1, gather_weights: bool = True) -> list[str]:
    """The decoded completions of prompt token `rows`, in input order: the evaluation's and the online
    sampler's one batching. Rows run shortest first (stable order) in batches of `batch_size`, left-padded to
    `width` (one program for all batches) or to the batch's longest row rounded up to `multiple`; the last batch
    is filled up with repeats so that every batch has one shape. `temperature`: a scalar or one per row; batch
    b samples with `fold_in(key(seed), b)`."""
    from mcpo_jax.data.text import decode_completion, left_pad

    eos_ids = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    per_row = np.ndim(temperature) > 0
    temperatures = np.asarray(temperature, np.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [""] * len(rows)
    key = jax.random.key(seed)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        fill = idx + [idx[-1]] * (batch_size - len(idx)) if len(order) > batch_size else idx
        ids, mask = left_pad([rows[i] for i in fill], pad, width=width, multiple=multiple)
        new = to_host(generate(model, ids, mask, max_new_tokens=max_new_tokens,
                               temperature=temperatures[fill] if per_row else temperature, top_p=top_p,
                               key=jax.random.fold_in(key, b), eos_id=eos_ids, gather_weights=gather_weights))
        for i, row in zip(idx, new):
            out[i] = decode_completion(tokenizer, row, eos_ids)
    return out


def generation_throughput(model, *, batch_size: int, prompt_len: int, new_tokens: int, warmup: int = 1,
                          steps: int = 3, temperature: float = 1.0, vocab_size: int | None = None,
                          seed: int = 0) -> dict:
    """Prefill and decode speed of :func:`generate` (the sampler OnMC-PO uses) on random prompts.

    ``generate`` is one call, so the two phases are told apart by difference: a call with ``max_new_tokens=1``
    is the prefill (plus one sampled token), and the extra time of ``new_tokens`` over 1 is the decode of
    ``new_tokens - 1`` tokens. Each timing is the median of ``steps`` calls after a compile call and ``warmup``
    more; EOS is disabled so every row decodes every token. prefill tok/s = B * prompt_len / t_1, decode tok/s =
    B * (new_tokens - 1) / (t_N - t_1) (None when the decode time is within the noise of the prefill).
    """
    rng = np.random.default_rng(seed + 1)
    vocab = vocab_size or model.config.vocab_size
    ids = jnp.asarray(rng.integers(0, vocab, size=(batch_size, prompt_len), dtype=np.int32))
    mask = jnp.ones((batch_size, prompt_len), jnp.int32)
    key = jax.random.key(seed)

    def timed(n):
        def call():
            return jax.block_until_ready(generate(model, ids, mask, max_new_tokens=n, temperature=temperature,
                                                  top_p=1.0, key=key, eos_id=None))

        start = time.perf_counter()
        call()  # compiles
        first = time.perf_counter() - start
        for _ in range(warmup):
            call()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return first, float(np.median(times))

    first_1, t_1 = timed(1)
    first_n, t_n = timed(new_tokens)
    decode_s = t_n - t_1 if new_tokens > 1 and t_n > t_1 else None
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": t_1,
        "prefill_tok_per_s": batch_size * prompt_len / t_1,
        "decode_s": decode_s,
        "decode_tok_per_s": batch_size * (new_tokens - 1) / decode_s if decode_s else None,
        "decode_ms_per_step": 1e3 * decode_s / (new_tokens - 1) if decode_s else None,
        "total_s": t_n,
        "generated_tok_per_s": batch_size * new_tokens / t_n,
        "first_call_s": {"1": first_1, str(new_tokens): first_n},
    }
