"""Flash attention for TPU through Pallas splash attention.

XLA attention materialises float32 scores [rows, heads, T, S] (and their softmax for the backward); the splash
kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) streams key blocks through VMEM with an online softmax
and never holds more than one [block_q, block_kv] tile of scores per head. Its own backward (a dkv and a dq kernel)
recomputes the tiles from q, k, v, the output and the per-query logsumexp.

How the model's masks map onto the kernel (one kernel call per row, vmapped over rows):

* causality and the sliding window are static: `CausalMask(offset=causal_offset)`, or one
  `LocalMask(window_size=(window - 1, 0), offset=causal_offset)` which is causal and windowed at once. Either is a
  "computable" mask: the kernel evaluates it from iotas inside the tile and skips tiles it rules out entirely
  (the upper triangle, the keys left of the window), with no mask array in memory;
* the per-row dynamic validity (right padding, a prompt's padding before the completion's own keys) is segment
  ids: valid keys are segment 1, invalid keys segment 0, every query segment 1;
* lengths are padded up to a multiple of the block sizes; padded keys are segment 0, padded queries are sliced off.

Constraints of the kernel in this jax version (0.10) that shape the code below:

* GQA is native in `make_splash_mha`: q [H, T, D] and k, v [K, S, D] with H % K == 0, q head h reading kv head
  h // (H // K), the grouping `jax.nn.dot_product_attention` uses; the dkv kernel sums a kv head's gradient over
  its query heads in VMEM, so k and v are never repeated.
* the kernel does not scale q·k: q is multiplied by `scale` before the call.
* head_dim need not be a multiple of 128 (the head_dim blocks are the whole axis); Llama-3.2-1B's 64 compiles
  for v5e as is (tests/test_splash.py::test_compiles_for_v5e_with_less_memory_than_xla).
* block_kv, block_kv_compute and block_kv_dq must be multiples of 128 (the score tile's lanes), and with segment
  ids so must the dkv kernel's block_q (its scores are transposed, queries in lanes): every block here is a
  multiple of 128, and every block must divide its padded length.
* a query whose every key is masked by segment ids gets the kernel's uniform average over the keys of the tiles
  it visits (finite: a masked logit is a large finite negative, not -inf) and a gradient that is not zero; its
  output is zeroed here instead, which also zeroes everything it would send back. A query block with no tile
  to visit at all would divide by 0: `_padded_lengths` keeps one for every query (the padding included).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

# The kernel's score tiles are [block_q, block_kv] with keys in the 128 lanes of a TPU vector register; segment
# ids and the computable masks are tiled per 128 lanes, so no block may be smaller.
LANES = 128
# 512 x 512 float32 score tiles (1 MiB, plus the same for exp and the backward's dp/ds) fit the 16 MiB of VMEM a
# v5e kernel may use by default, and are MaxText's splash defaults for Llama (sa_block_* = 512): large enough to
# amortise the per-grid-step overhead and keep the MXU busy at head_dim 64, while causal tile skipping still
# drops close to half the work. Shorter or non-dividing lengths step down to 256, then 128.
PREFERRED_BLOCK = 512
# The kernel tags its backward residuals (its output and the per-query logsumexp) with this name: a remat policy
# that saves it keeps the forward kernel from running again in the backward.
RESIDUALS_NAME = "splash_residuals"


def splash_attention(q_NTHD, k_NSKD, v_NSKD, *, kv_valid_NS, causal_offset: int, window: int | None,
                     scale: float, mesh=None, batch_axes=(), head_axis=None, interpret: bool = False,
                     block_sizes=None):
    """Masked GQA attention through the Pallas splash kernel: out [N, T, H, D] in q's dtype.

    Query i of row n attends key j iff `kv_valid_NS[n, j]` and `j <= i + causal_offset` and (window is None or
    `(i + causal_offset) - j < window`), all in array indices. Right-padded self-attention is T == S,
    causal_offset 0, kv_valid the attention mask; completions after a shared prompt are k, v = [P prompt keys |
    W own keys], causal_offset P, kv_valid False on the prompt's padding. A query with no key to attend returns
    zeros, and sends no gradient back.

    q_NTHD: [N, T, H, D]; k_NSKD, v_NSKD: [N, S, K, D] with H % K == 0 (q head h reads kv head h // (H // K)).
    kv_valid_NS: bool [N, S]. scale multiplies q·k (head_dim**-0.5 for the model).
    mesh: run under `jax.shard_map` on it (a Pallas call cannot be partitioned by GSPMD): rows split over
        `batch_axes` (those of them whose sizes N divides, in order), q and kv heads over `head_axis` when both
        H and K divide by its size; every other dimension is whole (`shard_spec`). Without a mesh, the kernel
        runs as is.
    interpret: run the Pallas kernels in interpret mode (the CPU tests).
    block_sizes: a `splash_attention_kernel.BlockSizes` with forward and backward blocks, all multiples of 128;
        T and S are padded to multiples of them. Default: `default_block_sizes` of the padded lengths.
    """
    N, T, H, D = q_NTHD.shape
    _, S, K, _ = k_NSKD.shape
    if k_NSKD.shape != (N, S, K, D) or v_NSKD.shape != (N, S, K, D):
        raise ValueError(f"k {k_NSKD.shape} and v {v_NSKD.shape} must both be [N={N}, S, K, D={D}]")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if kv_valid_NS.shape != (N, S):
        raise ValueError(f"kv_valid_NS {kv_valid_NS.shape} must be [N={N}, S={S}]")
    if causal_offset < 0:
        raise ValueError(f"causal_offset {causal_offset} < 0 would leave the first queries without keys")
    if window is not None and window < 1:
        raise ValueError(f"window {window} must be at least 1")

    def attend(q_NTHD, k_NSKD, v_NSKD, kv_valid_NS):
        return _attend_local(q_NTHD, k_NSKD, v_NSKD, kv_valid_NS, causal_offset=causal_offset, window=window,
                             scale=scale, interpret=interpret, block_sizes=block_sizes)

    if mesh is None:
        return attend(q_NTHD, k_NSKD, v_NSKD, kv_valid_NS)

    heads_spec = shard_spec(mesh, N, H, K, batch_axes, head_axis)
    return jax.shard_map(
        attend, mesh=mesh,
        in_specs=(heads_spec, heads_spec, heads_spec, P(heads_spec[0], None)),
        out_specs=heads_spec,
        # the kernel's outputs vary along the mesh axes as its inputs do, but the splash kernel's pallas_call
        # declares its outputs without `manual_axis_type`, which the check requires
        check_vma=False,
    )(q_NTHD, k_NSKD, v_NSKD, kv_valid_NS)


def shard_spec(mesh, N: int, H: int, K: int, batch_axes, head_axis) -> P:
    """The spec of q, k, v and the output ([rows, positions, heads, head_dim]) under shard_map: rows over the
    batch axes whose sizes N divides (taken in order, each multiplying the split), heads over `head_axis` when H
    and K both divide by its size (q heads and kv heads must split alike: shard h's q heads read shard h's kv
    heads), all else whole."""
    rows = []
    for axis in batch_axes:
        if N % (math.prod(mesh.shape[a] for a in rows) * mesh.shape[axis]) == 0:
            rows.append(axis)
    heads = head_axis if head_axis is not None and H % mesh.shape[head_axis] == 0 \
        and K % mesh.shape[head_axis] == 0 else None
    return P(tuple(rows) or None, None, heads, None)


def default_block_sizes(T_pad: int, S_pad: int) -> splash_kernel.BlockSizes:
    """Blocks for padded lengths (multiples of 128): PREFERRED_BLOCK where it divides the length, else 256,
    else 128. The backward kernels use the forward's tiles: dkv iterates [block_q, block_kv] tiles like the
    forward, and the separate dq kernel (not the fused one, whose dq is an unreduced float32
    [kv_blocks, H, T, D] buffer) keeps the same tile so its causal skipping matches."""
    block_q, block_kv = _dividing_block(T_pad), _dividing_block(S_pad)
    return splash_kernel.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )


def _dividing_block(length: int) -> int:
    block = PREFERRED_BLOCK
    while length % block:
        block //= 2
    return block


def _padded_lengths(T: int, S: int, causal_offset: int, window: int | None, block_sizes) -> tuple[int, int]:
    """T and S rounded up to whole blocks, S further so that every padded query keeps a key in its static mask:
    a query block with none would end the forward with a softmax denominator of 0, a logsumexp of -inf, and NaN
    in the backward's dk and dv (padded queries' cotangents are 0, but 0 * inf is not)."""
    if block_sizes is None:
        q_multiple = kv_multiple = LANES
    else:
        q_blocks = (block_sizes.block_q, block_sizes.block_q_dkv, block_sizes.block_q_dq)
        kv_blocks = (block_sizes.block_kv, block_sizes.block_kv_compute, block_sizes.block_kv_dkv,
                     block_sizes.block_kv_dkv_compute, block_sizes.block_kv_dq)
        if not block_sizes.has_backward_blocks or any(b % LANES for b in q_blocks + kv_blocks if b is not None):
            raise ValueError(f"splash block sizes must be multiples of {LANES}, backward blocks included: "
                             f"{block_sizes}")
        q_multiple = math.lcm(*[b for b in q_blocks if b is not None])
        kv_multiple = math.lcm(*[b for b in kv_blocks if b is not None])
    T_pad, S_pad = _round_up(T, q_multiple), _round_up(S, kv_multiple)
    if window is not None:  # the last query, T_pad - 1, sees keys from T_pad - 1 + causal_offset - window + 1
        S_pad = max(S_pad, _round_up(T_pad + causal_offset - window + 1, kv_multiple))
    return T_pad, S_pad


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _kernel(H: int, T_pad: int, S_pad: int, causal_offset: int, window: int | None, block_sizes,
            interpret: bool):
    """One row's kernel. Built afresh at every trace, never cached: it turns its numpy block maps into jax arrays,
    which inside a trace are that trace's values (a cached kernel would leak them into the next trace). Building
    walks the [T_pad / block_q, S_pad / block_kv] block grid in numpy, a few milliseconds at 8k tokens."""
    if window is None:
        head_mask = splash_mask.CausalMask((T_pad, S_pad), offset=causal_offset)
    else:  # left reach window - 1 and right reach 0: causal and windowed in one computable mask
        head_mask = splash_mask.LocalMask((T_pad, S_pad), window_size=(window - 1, 0), offset=causal_offset)
    # the same object for every head: the kernel deduplicates it into one block map for all heads
    mask = splash_mask.MultiHeadMask([head_mask] * H)
    return splash_kernel.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                         residual_checkpoint_name=RESIDUALS_NAME, interpret=interpret)


def _attend_local(q_NTHD, k_NSKD, v_NSKD, kv_valid_NS, *, causal_offset, window, scale, interpret, block_sizes):
    """`splash_attention` on the rows and heads at hand (one shard, or everything without a mesh)."""
    N, T, H, D = q_NTHD.shape
    S = k_NSKD.shape[1]
    T_pad, S_pad = _padded_lengths(T, S, causal_offset, window, block_sizes)
    if block_sizes is None:
        block_sizes = default_block_sizes(T_pad, S_pad)
    kernel = _kernel(H, T_pad, S_pad, causal_offset, window, block_sizes, interpret)

    q_NHTD = jnp.pad((q_NTHD * jnp.asarray(scale, q_NTHD.dtype)).transpose(0, 2, 1, 3),
                     ((0, 0), (0, 0), (0, T_pad - T), (0, 0)))
    k_NKSD = jnp.pad(k_NSKD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, S_pad - S), (0, 0)))
    v_NKSD = jnp.pad(v_NSKD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, S_pad - S), (0, 0)))
    segments = splash_kernel.SegmentIds(
        q=jnp.ones((N, T_pad), jnp.int32),
        kv=jnp.pad(kv_valid_NS.astype(jnp.int32), ((0, 0), (0, S_pad - S))),  # padded keys: segment 0
    )
    out_NHTD = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(q_NHTD, k_NKSD, v_NKSD, segments)
    out_NTHD = out_NHTD[:, :, :T].transpose(0, 2, 1, 3)
    has_key_NT = _has_key(kv_valid_NS, T, causal_offset, window)
    return jnp.where(has_key_NT[:, :, None, None], out_NTHD, jnp.zeros((), out_NTHD.dtype))


def _has_key(kv_valid_NS, T: int, causal_offset: int, window: int | None):
    """bool [N, T]: query i has a valid key in [i + offset - window + 1, i + offset], from the prefix sums of the
    valid keys ([N, S] work, never [N, T, S])."""
    S = kv_valid_NS.shape[1]
    count_NS1 = jnp.pad(jnp.cumsum(kv_valid_NS, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
    last_T = jnp.arange(T, dtype=jnp.int32) + causal_offset  # the newest key query i may see
    stop_T = jnp.clip(last_T + 1, 0, S)
    start_T = jnp.zeros_like(stop_T) if window is None else jnp.clip(last_T - window + 1, 0, S)
    return (count_NS1[:, stop_T] - count_NS1[:, start_T]) > 0
