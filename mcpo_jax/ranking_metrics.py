"""Held-out metrics that do not depend on which negatives a run's sampler picks.

The objectives' own metrics (``rewards/margins``, ``rewards/accuracies``) are computed over the *selected*
negatives, so they differ by sampler even for the same policy: Min selects the candidate the policy already
likes least and reports ~100% accuracy. These read every valid candidate instead:

* ``heldout/margin_mean``: the preferred answer's implicit reward minus each valid candidate's, averaged over
  the candidates of a prompt; ``heldout/margin_min``: the smallest of those (against the candidate the policy
  likes most); ``heldout/accuracy_all``: 1 if y0 beats every valid candidate.
* ``heldout/spearman`` / ``heldout/kendall``: the rank correlation (Spearman's rho on average ranks, Kendall's
  tau-b) between the implicit rewards of y0 and the candidates and the data's ranking (rank 1 = best), over the
  columns whose rank is known (>= 1). +1: the policy orders the answers as the data does; 0 when either side is
  constant (e.g. every reward equal at step 0).

Implicit reward: beta * (log pi - log pi_ref), or beta * log pi for reference-free objectives. Every function
is pure jax on [B, C] arrays (column 0 = y0) and returns per-prompt values with a per-prompt mask, reduced by
``sums`` to the trainer's (sum, count) pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_RANKED = 2  # a correlation needs at least two ranked answers


def implicit_rewards(policy_logps_BC, ref_logps_BC, beta):
    policy = jnp.asarray(policy_logps_BC, jnp.float32)
    return beta * (policy if ref_logps_BC is None else policy - jnp.asarray(ref_logps_BC, jnp.float32))


def margins_over_candidates(rewards_BC, valid_BC):
    """(mean margin [B], min margin [B], y0 beats all [B], has a candidate [B]) over the valid columns 1..C-1."""
    rewards_BC = jnp.asarray(rewards_BC, jnp.float32)
    cand_BL = jnp.asarray(valid_BC, bool)[:, 1:]
    margin_BL = rewards_BC[:, :1] - rewards_BC[:, 1:]
    count_B = jnp.sum(cand_BL, axis=1)
    has_B = count_B > 0
    mean_B = jnp.sum(jnp.where(cand_BL, margin_BL, 0.0), axis=1) / jnp.maximum(count_B, 1)
    min_B = jnp.where(has_B, jnp.min(jnp.where(cand_BL, margin_BL, jnp.inf), axis=1), 0.0)
    beats_B = (jnp.where(has_B, min_B, 0.0) > 0).astype(jnp.float32)
    return mean_B, min_B, beats_B, has_B


def _average_ranks(x_BC, known_BC):
    """1-based ranks of x among the known columns of each row, ties given their average rank."""
    below = (x_BC[:, None, :] < x_BC[:, :, None]) & known_BC[:, None, :]
    equal = (x_BC[:, None, :] == x_BC[:, :, None]) & known_BC[:, None, :]
    return 1.0 + jnp.sum(below, axis=2) + 0.5 * (jnp.sum(equal, axis=2) - 1.0)


def _pearson(a_BC, b_BC, known_BC):
    n_B = jnp.maximum(jnp.sum(known_BC, axis=1, keepdims=True), 1)
    da = jnp.where(known_BC, a_BC - jnp.sum(jnp.where(known_BC, a_BC, 0.0), 1, keepdims=True) / n_B, 0.0)
    db = jnp.where(known_BC, b_BC - jnp.sum(jnp.where(known_BC, b_BC, 0.0), 1, keepdims=True) / n_B, 0.0)
    denom_B = jnp.sqrt(jnp.sum(da * da, 1) * jnp.sum(db * db, 1))
    return jnp.where(denom_B > 0, jnp.sum(da * db, 1) / jnp.where(denom_B > 0, denom_B, 1.0), 0.0)


def rank_correlations(rewards_BC, ranks_BC, valid_BC):
    """(Spearman [B], Kendall tau-b [B], has >= 2 ranked answers [B]) between the rewards and the data's
    ranking (rank 1 = best: the score correlated with the rewards is -rank); columns with rank < 1 are unknown."""
    rewards_BC = jnp.asarray(rewards_BC, jnp.float32)
    ranks_BC = jnp.asarray(ranks_BC)
    known_BC = jnp.asarray(valid_BC, bool) & (ranks_BC >= 1)
    quality_BC = -ranks_BC.astype(jnp.float32)
    has_B = jnp.sum(known_BC, axis=1) >= MIN_RANKED
    spearman_B = _pearson(_average_ranks(rewards_BC, known_BC), _average_ranks(quality_BC, known_BC), known_BC)
    pair_BCC = known_BC[:, :, None] & known_BC[:, None, :] & jnp.triu(jnp.ones(known_BC.shape[1:] * 2, bool), 1)
    sr_BCC = jnp.sign(rewards_BC[:, :, None] - rewards_BC[:, None, :])
    sq_BCC = jnp.sign(quality_BC[:, :, None] - quality_BC[:, None, :])
    concordance_B = jnp.sum(jnp.where(pair_BCC, sr_BCC * sq_BCC, 0.0), axis=(1, 2))
    untied_r_B = jnp.sum(pair_BCC & (sr_BCC != 0), axis=(1, 2))
    untied_q_B = jnp.sum(pair_BCC & (sq_BCC != 0), axis=(1, 2))
    denom_B = jnp.sqrt((untied_r_B * untied_q_B).astype(jnp.float32))
    kendall_B = jnp.where(denom_B > 0, concordance_B / jnp.where(denom_B > 0, denom_B, 1.0), 0.0)
    return jnp.where(has_B, spearman_B, 0.0), jnp.where(has_B, kendall_B, 0.0), has_B


def sums(policy_logps_BC, ref_logps_BC, beta, valid_BC, ranks_BC=None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The metrics above as (sum over prompts, number of prompts) pairs; no ranking metrics without ranks."""
    rewards_BC = jax.lax.stop_gradient(implicit_rewards(policy_logps_BC, ref_logps_BC, beta))
    mean_B, min_B, beats_B, has_B = margins_over_candidates(rewards_BC, valid_BC)
    count = jnp.sum(has_B).astype(jnp.float32)
    total = lambda x_B, m_B: jnp.sum(jnp.where(m_B, x_B, 0.0))
    out = {
        "heldout/margin_mean": (total(mean_B, has_B), count),
        "heldout/margin_min": (total(min_B, has_B), count),
        "heldout/accuracy_all": (total(beats_B, has_B), count),
    }
    if ranks_BC is not None:
        spearman_B, kendall_B, ranked_B = rank_correlations(rewards_BC, ranks_BC, valid_BC)
        ranked = jnp.sum(ranked_B).astype(jnp.float32)
        out["heldout/spearman"] = (total(spearman_B, ranked_B), ranked)
        out["heldout/kendall"] = (total(kendall_B, ranked_B), ranked)
    return out
