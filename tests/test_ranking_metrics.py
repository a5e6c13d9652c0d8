"""Held-out metrics over every candidate (mcpo_jax.ranking_metrics), against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax import ranking_metrics as rm

# Row 0: rewards 2, 1, 3, 0, ranks 1, 3, 4, 5. Row 1: all rewards equal (step 0), one unranked column.
# Row 2: a tie between y0 and a candidate, column 3 invalid (its reward must not be read). Row 3: y0 alone.
REWARDS = np.array([[2.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 5.0], [1.0, 9.0, 9.0, 9.0]])
RANKS = np.array([[1, 3, 4, 5], [1, 3, 4, -1], [1, 3, 4, 5], [1, 3, 4, 5]])
VALID = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], bool)


def test_margins_over_every_candidate():
    mean, low, beats, has = map(np.asarray, rm.margins_over_candidates(REWARDS, VALID))
    # row 0: margins 1, -1, 2; row 1: 0, 0, 0; row 2: 0, 1 (column 3 invalid); row 3: no candidate
    np.testing.assert_allclose(mean[:3], [2 / 3, 0.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(low[:3], [-1.0, 0.0, 0.0])
    np.testing.assert_array_equal(beats, [0, 0, 0, 0])
    np.testing.assert_array_equal(has, [True, True, True, False])
    _, _, beats, _ = rm.margins_over_candidates(np.array([[3.0, 1.0, 2.0]]), np.ones((1, 3), bool))
    assert float(beats[0]) == 1.0


def test_rank_correlations_by_hand():
    spearman, kendall, has = map(np.asarray, rm.rank_correlations(REWARDS, RANKS, VALID))
    # row 0: reward ranks 3 2 4 1 vs quality ranks 4 3 2 1: rho = 1 - 6 * 6 / (4 * 15) = 0.4;
    #        pairs +1 -1 +1 -1 +1 +1: tau = 2 / 6.
    # row 1: constant rewards -> 0. row 2: average ranks 2.5 2.5 1 vs 3 2 1: rho = 1.5 / sqrt(1.5 * 2);
    #        tau-b = 2 / sqrt(2 * 3). row 3: one ranked answer -> excluded.
    np.testing.assert_allclose(spearman, [0.4, 0.0, 1.5 / np.sqrt(3.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(kendall, [1 / 3, 0.0, 2 / np.sqrt(6.0), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(has, [True, True, True, False])
    # perfect agreement and perfect reversal
    s, k, _ = rm.rank_correlations(np.array([[4.0, 3.0, 2.0, 1.0]]), np.array([[1, 3, 4, 5]]), np.ones((1, 4), bool))
    np.testing.assert_allclose([float(s[0]), float(k[0])], [1.0, 1.0], rtol=1e-6)
    s, k, _ = rm.rank_correlations(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([[1, 3, 4, 5]]), np.ones((1, 4), bool))
    np.testing.assert_allclose([float(s[0]), float(k[0])], [-1.0, -1.0], rtol=1e-6)


def test_agrees_with_scipy_on_random_rows():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    rewards = np.round(rng.normal(size=(50, 6)), 1)  # rounding makes ties
    ranks = np.stack([rng.permutation(6) + 1 for _ in range(50)])
    valid = rng.uniform(size=(50, 6)) > 0.2
    valid[:, :3] = True
    s, k, _ = map(np.asarray, rm.rank_correlations(rewards, ranks, valid))
    for i in range(50):
        cols = np.flatnonzero(valid[i])
        np.testing.assert_allclose(s[i], stats.spearmanr(rewards[i, cols], -ranks[i, cols]).statistic, atol=1e-5)
        np.testing.assert_allclose(k[i], stats.kendalltau(rewards[i, cols], -ranks[i, cols]).statistic, atol=1e-5)


def test_sums_are_per_prompt_sum_count_pairs_and_jit():
    beta = 0.5
    ref = np.full(REWARDS.shape, -3.0)
    policy = REWARDS / beta + ref  # beta * (policy - ref) = REWARDS
    out = jax.jit(lambda p, r, v, k: rm.sums(p, r, beta, v, k))(policy, ref, VALID, RANKS)
    got = {k: (float(s), float(c)) for k, (s, c) in out.items()}
    np.testing.assert_allclose(got["heldout/margin_mean"], (2 / 3 + 0.5, 3.0), rtol=1e-6)
    np.testing.assert_allclose(got["heldout/margin_min"], (-1.0, 3.0), rtol=1e-6)
    np.testing.assert_allclose(got["heldout/accuracy_all"], (0.0, 3.0))
    np.testing.assert_allclose(got["heldout/spearman"], (0.4 + 1.5 / np.sqrt(3.0), 3.0), rtol=1e-6)
    np.testing.assert_allclose(got["heldout/kendall"], (1 / 3 + 2 / np.sqrt(6.0), 3.0), rtol=1e-6)
    # reference-free: beta * log pi; no ranks, no correlation
    free = rm.sums(jnp.asarray(REWARDS / beta), None, beta, VALID)
    assert set(free) == {"heldout/margin_mean", "heldout/margin_min", "heldout/accuracy_all"}
    np.testing.assert_allclose(float(free["heldout/margin_mean"][0]), 2 / 3 + 0.5, rtol=1e-6)
