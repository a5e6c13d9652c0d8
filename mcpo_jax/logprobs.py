"""Per-sequence log-probabilities from final hidden states, chunked over the sequence.

The LM head turns `hidden [N, T, D]` into logits `[N, T, V]`; with V = 128k, six candidates and
1024 tokens a float32 log-softmax of all rows would be gigabytes. Here the sequence axis is cut
into chunks of `chunk_size` positions that a `lax.scan` visits one at a time: at most one float32
`[N, chunk_size, V]` block is alive at any time. The row axis is left whole so that it keeps the
batch sharding of the step; rows are bounded by the micro-batch size.

What the backward keeps (`_chunk_logps` is a custom_vjp): each chunk's softmax in the compute dtype
(bf16 in training: N x chunk x V x 2 bytes), so the backward is two matmuls (dh, dW) and never recomputes
the chunk's logits (the former `jax.checkpoint` per chunk ran the head's forward matmul a second time:
+2·N_head FLOPs per trained token). Forward-only passes save nothing.

`window`: the LM head runs only on the `window` positions that predict completion tokens (from each row's
first loss-mask position), not on the prompt's. It must be at least the longest completion (the data's
`max_completion_length`); `window_overflow` counts the completion tokens a too-short window would drop.

Convention (the data pipeline's): token t of a completion is predicted from position t - 1, and
`loss_mask[t] = 1` on completion tokens (the EOS included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128


@jax.custom_vjp
def _chunk_logps(hidden_NCD, head_DV, targets_NC):
    return _chunk_fwd(hidden_NCD, head_DV, targets_NC)[0]


def _chunk_fwd(hidden_NCD, head_DV, targets_NC):
    logits_NCV = jnp.einsum("ncd,dv->ncv", hidden_NCD, head_DV, preferred_element_type=jnp.float32)
    logz_NC = jax.nn.logsumexp(logits_NCV, axis=-1)
    target_logit_NC = jnp.take_along_axis(logits_NCV, targets_NC[..., None], axis=-1)[..., 0]
    probs_NCV = jnp.exp(logits_NCV - logz_NC[..., None]).astype(hidden_NCD.dtype)
    return target_logit_NC - logz_NC, (hidden_NCD, head_DV, targets_NC, probs_NCV)


def _chunk_bwd(res, g_NC):
    hidden_NCD, head_DV, targets_NC, probs_NCV = res
    # d logp[t] / d logits = onehot(t) - softmax
    onehot_NCV = jax.nn.one_hot(targets_NC, probs_NCV.shape[-1], dtype=probs_NCV.dtype)
    dlogits_NCV = ((onehot_NCV - probs_NCV) * g_NC[..., None].astype(probs_NCV.dtype)).astype(hidden_NCD.dtype)
    d_hidden = jnp.einsum("ncv,dv->ncd", dlogits_NCV, head_DV, preferred_element_type=jnp.float32)
    d_head = jnp.einsum("ncd,ncv->dv", hidden_NCD, dlogits_NCV, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden_NCD.dtype), d_head.astype(head_DV.dtype), None


_chunk_logps.defvjp(_chunk_fwd, _chunk_bwd)


def token_logps(hidden_NTD, lm_head_DV, input_ids_NT, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """log p(input_ids[:, t] | prefix) for t = 1..T-1 as float32 `[N, T-1]`, chunked over t."""
    n, t, d = hidden_NTD.shape
    steps = t - 1
    chunk = max(1, min(chunk_size, steps))
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps
    hidden_NSD = hidden_NTD[:, :-1]
    targets_NS = input_ids_NT[:, 1:].astype(jnp.int32)
    if pad:
        hidden_NSD = jnp.pad(hidden_NSD, ((0, 0), (0, pad), (0, 0)))
        targets_NS = jnp.pad(targets_NS, ((0, 0), (0, pad)))
    # [K, N, chunk, ...]: the scan walks the leading chunk axis.
    hidden_KNCD = hidden_NSD.reshape(n, num_chunks, chunk, d).swapaxes(0, 1)
    targets_KNC = targets_NS.reshape(n, num_chunks, chunk).swapaxes(0, 1)
    head_DV = lm_head_DV.astype(hidden_NTD.dtype)

    def scan_fn(carry, xs):
        return carry, _chunk_logps(xs[0], head_DV, xs[1])

    _, logps_KNC = jax.lax.scan(scan_fn, None, (hidden_KNCD, targets_KNC))
    return logps_KNC.swapaxes(0, 1).reshape(n, num_chunks * chunk)[:, :steps]


def _window_index(loss_mask_NT, window: int):
    """[N, W] positions (of the shifted sequence, 0..T-2) each row's LM-head window covers: from the first
    completion position, moved left where it would run past the end."""
    mask_NS = loss_mask_NT[:, 1:] > 0
    steps = mask_NS.shape[1]
    start_N = jnp.minimum(jnp.argmax(mask_NS, axis=1), steps - window).astype(jnp.int32)
    return start_N[:, None] + jnp.arange(window, dtype=jnp.int32)[None]


def window_overflow(loss_mask_NT, window: int | None):
    """Completion tokens per row that fall outside the LM-head window (0 when the window is long enough)."""
    total_N = jnp.sum(loss_mask_NT[:, 1:] > 0, axis=1)
    if window is None or window >= loss_mask_NT.shape[1] - 1:
        return jnp.zeros_like(total_N)
    inside = jnp.take_along_axis(loss_mask_NT[:, 1:] > 0, _window_index(loss_mask_NT, window), axis=1)
    return total_N - jnp.sum(inside, axis=1)


def sequence_logps(
    hidden_NTD, lm_head_DV, input_ids_NT, loss_mask_NT, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    window: int | None = None,
):
    """Sum of completion-token log-probs per row: float32 `[N]`. With `window`, the LM head runs on the
    `window` positions from each row's first completion token only (see the module docstring)."""
    if window is not None and window < hidden_NTD.shape[1] - 1:
        idx_NW = _window_index(loss_mask_NT, window)
        hidden_NWD = jnp.take_along_axis(hidden_NTD[:, :-1], idx_NW[..., None], axis=1)
        # token_logps predicts position i + 1 from i: append one dummy position so the targets line up
        hidden_NTD = jnp.pad(hidden_NWD, ((0, 0), (0, 1), (0, 0)))
        targets_NW = jnp.take_along_axis(input_ids_NT[:, 1:], idx_NW, axis=1)
        input_ids_NT = jnp.pad(targets_NW, ((0, 0), (1, 0)))
        loss_mask_NT = jnp.pad(jnp.take_along_axis(loss_mask_NT[:, 1:], idx_NW, axis=1), ((0, 0), (1, 0)))
    logps_NS = token_logps(hidden_NTD, lm_head_DV, input_ids_NT, chunk_size=chunk_size)
    mask_NS = loss_mask_NT[:, 1:].astype(jnp.float32)
    return jnp.sum(logps_NS * mask_NS, axis=-1)


def shared_prompt_windows(prompt_window, completion_window, rows: int, length: int) -> tuple[int, int] | None:
    """(P, W): prompt and completion positions of the shared-prompt layout for `rows` rows of `length` tokens
    per example, or None when it would not run fewer tokens than the rows whole (P + rows·W >= rows·length:
    short length buckets, a single row). Both are rounded up to even numbers (at most `length`): cuDNN's flash
    attention with a mask (the completions') takes only even query and key lengths when training."""
    if prompt_window is None or completion_window is None or length < 2:
        return None
    even = lambda n: min(n + n % 2, length)
    p, w = even(min(int(prompt_window), length - 1)), even(min(int(completion_window), length - 1))
    return (p, w) if p + rows * w < rows * length else None


def naive_sequence_logps(logits_NTV, input_ids_NT, loss_mask_NT):
    """Reference implementation from full logits (tests, tiny models)."""
    logp_NTV = jax.nn.log_softmax(logits_NTV[:, :-1].astype(jnp.float32), axis=-1)
    tok_NS = jnp.take_along_axis(logp_NTV, input_ids_NT[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(tok_NS * loss_mask_NT[:, 1:].astype(jnp.float32), axis=-1)
