"""The MC kernel (paper Algorithm 1) and its variants: which candidates become the negatives.

    select_negatives(key, policy_logps_BC, ref_logps_BC, *, beta, num_negatives, strategy="mc",
                     include_preferred=None, valid=None) -> int32 [B, M]

Candidates are the columns of the [B, C] per-sequence log-probs; column 0 is the preferred y0, columns
1..L the dataset's candidates. The kernel weights are the softmax of beta * r over the eligible columns,
r = log pi - log pi_ref (or log pi alone when ``ref_logps`` is None, for reference-free objectives).

Strategies (``STRATEGIES``):
  * ``"mc"``: Algorithm 1. M = 1 draws z ~ Categorical(softmax(beta r)) with ``jax.random.categorical``;
    M > 1 draws M columns without replacement by Gumbel top-k (the first index is exactly a categorical draw,
    the set is sequential sampling without replacement in proportion to the weights).
  * ``"max"`` / ``"min"``: the M largest / smallest weights, in order (the paper's Fig. 2 variants). Ties are
    broken uniformly at random (from ``key``): at step 0 every log-ratio is 0, and a fixed tie-break (the
    lower column, i.e. the best remaining candidate in ranked data) would start Min on the hardest negative.
    Inputs without ties give the same indices for every key.
  * ``"random"``: M columns uniformly without replacement (RNCE; the paper's DPO baseline).

``include_preferred``: Algorithm 1 computes w_i for i = 0..L and samples z ~ Categorical(w_0..w_L), y0
included. A drawn y0 puts a copy of y0 in the loss, whose gradient is exactly zero for M = 1
(-beta r_0 + log(2 exp(beta r_0)) = log 2): the kernel skips examples the policy already ranks right, in
proportion to w_0. The default (None) is the paper's: y0 eligible for ``"mc"``; ``"max"`` / ``"min"`` /
``"random"`` pick among the candidates (Fig. 2 "among all candidates"; DPO's random dispreferred). True / False
force column 0 in / out for every strategy (False for "mc": candidates only, the earlier default).

Invalid columns (``valid`` False) are never selected. A prompt with fewer eligible candidates than M cannot
be served inside a jitted step (the output has a static shape), so it must be rejected when batches are
built: ``check_enough_candidates`` does that with a message naming the row. Everything else here is pure
jax: deterministic for a key, jit/vmap compatible, no host round trips; with the default partitionable
threefry the draws do not depend on how the batch is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("mc", "max", "min", "random")
SAMPLERS = (*STRATEGIES, "fixed")  # the trainer's `sampler`: a strategy, or the dataset's own negative


def _eligible(valid_BC, shape, include_preferred):
    b, c = shape
    valid_BC = jnp.ones((b, c), bool) if valid_BC is None else jnp.asarray(valid_BC).astype(bool)
    if valid_BC.shape != (b, c):
        raise ValueError(f"valid has shape {valid_BC.shape}, expected {(b, c)}")
    column = jnp.arange(c)[None, :]
    return valid_BC & ((column > 0) | include_preferred)


def _logits(policy_logps_BC, ref_logps_BC, beta, eligible_BC):
    """beta * r on eligible columns, -inf elsewhere (garbage in ineligible columns is never read)."""
    policy = jnp.asarray(policy_logps_BC)
    dtype = jnp.result_type(policy.dtype, jnp.float32)
    r = policy.astype(dtype)
    if ref_logps_BC is not None:
        r = r - jnp.asarray(ref_logps_BC).astype(dtype)
    return jnp.where(eligible_BC, beta * jnp.where(eligible_BC, r, 0.0), -jnp.inf)


def weights(policy_logps, ref_logps, *, beta, valid=None, include_preferred=True):
    """The kernel's softmax weights [B, C] over the eligible columns (0 elsewhere; all 0 for a row with no
    eligible column): Algorithm 1's w_0..w_L by default, w_1..w_L renormalised with ``include_preferred=False``.
    For metrics such as the kernel entropy; stable for reward gaps of +-1e4."""
    policy = jnp.asarray(policy_logps)
    eligible = _eligible(valid, policy.shape, include_preferred)
    logits = _logits(policy, ref_logps, beta, eligible)
    shift = jnp.max(logits, axis=1, keepdims=True)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    unnorm = jnp.where(eligible, jnp.exp(jnp.where(eligible, logits - shift, 0.0)), 0.0)
    total = jnp.sum(unnorm, axis=1, keepdims=True)
    return unnorm / jnp.where(total > 0, total, 1.0)


def preferred_eligible(strategy: str, include_preferred: bool | None = None) -> bool:
    """Whether y0 (column 0) may be drawn: ``include_preferred`` when given, else Algorithm 1's choice (only the
    MC kernel samples over w_0..w_L)."""
    return strategy == "mc" if include_preferred is None else bool(include_preferred)


def select_negatives(key, policy_logps, ref_logps, *, beta, num_negatives, strategy="mc",
                     include_preferred=None, valid=None):
    """Indices [B, M] (int32) into the candidate axis of ``policy_logps`` [B, C]; see the module docstring."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown kernel strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    include_preferred = preferred_eligible(strategy, include_preferred)
    policy_BC = jnp.asarray(policy_logps)
    if policy_BC.ndim != 2:
        raise ValueError(f"policy_logps must be [B, C], got shape {policy_BC.shape}")
    b, c = policy_BC.shape
    m = int(num_negatives)
    eligible_max = c if include_preferred else c - 1
    if not 1 <= m <= eligible_max:
        raise ValueError(
            f"num_negatives={m} must be between 1 and the number of candidate columns ({eligible_max} of C={c}"
            f"{', y0 included' if include_preferred else ', y0 excluded'})"
        )
    eligible_BC = _eligible(valid, (b, c), include_preferred)

    if strategy == "mc":
        logits_BC = _logits(policy_BC, ref_logps, beta, eligible_BC)
        if m == 1:
            return jax.random.categorical(key, logits_BC, axis=1)[:, None].astype(jnp.int32)
        scores_BC = logits_BC + jax.random.gumbel(key, (b, c), logits_BC.dtype)
    elif strategy == "random":
        scores_BC = jnp.where(eligible_BC, jax.random.gumbel(key, (b, c)), -jnp.inf)
    else:
        logits_BC = _logits(policy_BC, ref_logps, beta, eligible_BC)
        if strategy == "max":
            scores_BC = logits_BC
        else:  # "min": largest of -logits among eligible columns
            scores_BC = jnp.where(eligible_BC, -logits_BC, -jnp.inf)
        return _top_k_random_ties(key, scores_BC, m)
    _, idx_BM = jax.lax.top_k(scores_BC, m)
    return idx_BM.astype(jnp.int32)


def _top_k_random_ties(key, scores_BC, m):
    """``top_k`` whose ties are broken uniformly at random: top_k prefers the lower index among equal scores,
    so the columns are shuffled by a per-row random permutation first and the indices mapped back. Untied
    scores select exactly what ``top_k`` selects; among k tied columns competing for fewer than k places each
    is picked with the same probability."""
    b, c = scores_BC.shape
    # Ineligible columns (-inf) keep their column order after every eligible one, so a row short of
    # candidates is filled exactly as plain top_k fills it.
    order_BC = jnp.where(scores_BC > -jnp.inf, jax.random.uniform(key, (b, c)), 1.0 + jnp.arange(c) / c)
    perm_BC = jnp.argsort(order_BC, axis=1)
    top_BM, idx_perm_BM = jax.lax.top_k(jnp.take_along_axis(scores_BC, perm_BC, axis=1), m)
    idx_BM = jnp.take_along_axis(perm_BC, idx_perm_BM, axis=1)
    # Which tied columns are picked is random; the picked ones come in (score, column) order, so a selection
    # of every eligible column (M = L) is columns 1..L in order, as plain top_k returns it.
    order_BM = jnp.lexsort((idx_BM, -top_BM), axis=1)
    return jnp.take_along_axis(idx_BM, order_BM, axis=1).astype(jnp.int32)


def check_enough_candidates(valid, num_negatives, *, include_preferred=False):
    """Host-side check at batch construction: every row of ``valid`` [N, C] (numpy) must have at least
    ``num_negatives`` eligible candidates (valid columns 1..L, plus column 0 when ``include_preferred``).
    Raises ValueError naming the first offending row."""
    valid = np.asarray(valid).astype(bool)
    if valid.ndim != 2:
        raise ValueError(f"valid must be [N, C], got shape {valid.shape}")
    counts = valid[:, 1:].sum(axis=1) + (valid[:, 0] if include_preferred else 0)
    bad = np.flatnonzero(counts < num_negatives)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"row {row} has {int(counts[row])} eligible candidate(s) but num_negatives={num_negatives} "
            f"({bad.size} of {valid.shape[0]} rows too short); drop those prompts or lower num_negatives"
        )
