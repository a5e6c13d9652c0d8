"""Per-sequence log-probabilities from final hidden states, chunked over the sequence.

The LM head turns `hidden [N, T, D]` into logits `[N, T, V]`; with V = 128k, six candidates and
1024 tokens a float32 log-softmax of all rows would be gigabytes. Here the sequence axis is cut
into chunks of `chunk_size` positions that a `lax.scan` visits one at a time; each chunk's body
is wrapped in `jax.checkpoint`, so the backward pass recomputes that chunk's logits instead of
storing them. At most one float32 `[N, chunk_size, V]` block is alive at any time, forward or
backward. The row axis is left whole so that it keeps the batch sharding of the step; rows are
bounded by the micro-batch size.

Convention (the data pipeline's): token t of a completion is predicted from position t - 1, and
`loss_mask[t] = 1` on completion tokens (the EOS included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128


def _chunk_logps(hidden_NCD, head_DV, targets_NC):
    logits_NCV = jnp.einsum("ncd,dv->ncv", hidden_NCD, head_DV, preferred_element_type=jnp.float32)
    logz_NC = jax.nn.logsumexp(logits_NCV, axis=-1)
    target_logit_NC = jnp.take_along_axis(logits_NCV, targets_NC[..., None], axis=-1)[..., 0]
    return target_logit_NC - logz_NC


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

    body = jax.checkpoint(_chunk_logps)

    def scan_fn(carry, xs):
        return carry, body(xs[0], head_DV, xs[1])

    _, logps_KNC = jax.lax.scan(scan_fn, None, (hidden_KNCD, targets_KNC))
    return logps_KNC.swapaxes(0, 1).reshape(n, num_chunks * chunk)[:, :steps]


def sequence_logps(
    hidden_NTD, lm_head_DV, input_ids_NT, loss_mask_NT, *, chunk_size: int = DEFAULT_CHUNK_SIZE
):
    """Sum of completion-token log-probs per row: float32 `[N]`."""
    logps_NS = token_logps(hidden_NTD, lm_head_DV, input_ids_NT, chunk_size=chunk_size)
    mask_NS = loss_mask_NT[:, 1:].astype(jnp.float32)
    return jnp.sum(logps_NS * mask_NS, axis=-1)


def naive_sequence_logps(logits_NTV, input_ids_NT, loss_mask_NT):
    """Reference implementation from full logits (tests, tiny models)."""
    logp_NTV = jax.nn.log_softmax(logits_NTV[:, :-1].astype(jnp.float32), axis=-1)
    tok_NS = jnp.take_along_axis(logp_NTV, input_ids_NT[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(tok_NS * loss_mask_NT[:, 1:].astype(jnp.float32), axis=-1)
