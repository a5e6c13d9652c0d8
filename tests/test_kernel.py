"""The MC kernel (Algorithm 1) and its max / min / random variants."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax import kernel

DRAWS = 25_000
BETA = 0.5
# One prompt, y0 + 5 candidates; candidate 3 is padding (garbage log-probs that must never be read).
POLICY = np.array([-10.0, -12.0, -9.0, np.nan, -14.0, -10.5])
REF = np.array([-11.0, -11.0, -11.0, np.inf, -12.0, -12.0])
VALID = np.array([True, True, True, False, True, True])


def _softmax_np(include_preferred):
    eligible = VALID & ((np.arange(6) > 0) | include_preferred)
    logits = np.where(eligible, BETA * (np.nan_to_num(POLICY) - np.nan_to_num(REF, posinf=0)), -np.inf)
    w = np.exp(logits - logits.max())
    return w / w.sum()


def _tiled(n=DRAWS):
    tile = lambda x: jnp.asarray(np.tile(x, (n, 1)))
    return tile(POLICY).astype(jnp.float32), tile(REF).astype(jnp.float32), tile(VALID)


def _select(key, n=DRAWS, **kw):
    policy, ref, valid = _tiled(n)
    kw.setdefault("beta", BETA)
    return np.asarray(kernel.select_negatives(key, policy, ref, valid=valid, **kw))


def test_weights_match_softmax_and_are_stable():
    policy, ref, valid = _tiled(2)
    for include in (False, True):
        w = np.asarray(kernel.weights(policy, ref, beta=BETA, valid=valid, include_preferred=include))
        np.testing.assert_allclose(w[0], _softmax_np(include), rtol=1e-5, atol=1e-7)
    extreme = jnp.asarray([[0.0, 1e4, -1e4, 0.0], [5.0, -1e4, -1e4, -1e4]])
    w = np.asarray(kernel.weights(extreme, None, beta=1.0, valid=jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]]),
                                  include_preferred=False))
    np.testing.assert_allclose(w, [[0, 1, 0, 0], [0, 0, 0, 0]], atol=1e-7)  # no eligible column -> zeros


@pytest.mark.parametrize("include_preferred", [False, True])
def test_mc_single_draw_frequencies_match_weights(include_preferred):
    idx = _select(jax.random.key(0), num_negatives=1, include_preferred=include_preferred)
    assert idx.shape == (DRAWS, 1) and idx.dtype == np.int32
    freq = np.bincount(idx[:, 0], minlength=6) / DRAWS
    expected = _softmax_np(include_preferred)
    assert np.max(np.abs(freq - expected)) < 0.01, (freq, expected)
    assert freq[3] == 0.0  # invalid never drawn
    assert (freq[0] > 0.05) == include_preferred


def test_mc_without_replacement_matches_sequential_sampling():
    """Gumbel top-k, M = 2: distinct valid columns; the first is a categorical draw and the inclusion
    probabilities are those of sampling twice without replacement: P(i in S) = w_i + sum_j w_j w_i/(1-w_j)."""
    idx = _select(jax.random.key(1), num_negatives=2, include_preferred=False)
    assert np.all(idx[:, 0] != idx[:, 1])
    assert not np.isin(idx, [0, 3]).any()
    w = _softmax_np(False)
    first = np.bincount(idx[:, 0], minlength=6) / DRAWS
    assert np.max(np.abs(first - w)) < 0.01
    inclusion = np.array([np.mean(np.any(idx == i, axis=1)) for i in range(6)])
    expected = np.array([w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(6) if j != i and w[j] > 0)
                         for i in range(6)])
    assert np.max(np.abs(inclusion - expected)) < 0.012, (inclusion, expected)


def test_mc_many_negatives_distinct_and_valid():
    rng = np.random.default_rng(0)
    b, c, m = 512, 9, 4
    policy = jnp.asarray(rng.normal(size=(b, c)) * 50, jnp.float32)
    valid = rng.uniform(size=(b, c)) > 0.3
    valid[:, 1 : 1 + m] = True  # every row has >= m valid candidates
    valid = rng.permuted(valid[:, 1:], axis=1)  # ... in random places
    valid = np.concatenate([np.ones((b, 1), bool), valid], axis=1)
    kernel.check_enough_candidates(valid, m)
    for strategy, include in itertools.product(("mc", "random", "max", "min"), (False, True)):
        idx = np.asarray(kernel.select_negatives(jax.random.key(3), policy, None, beta=1.0, num_negatives=m,
                                                 strategy=strategy, include_preferred=include,
                                                 valid=jnp.asarray(valid)))
        assert idx.shape == (b, m)
        assert all(len(set(row)) == m for row in idx), strategy
        assert np.all(np.take_along_axis(valid, idx, axis=1)), strategy
        if not include:
            assert not np.any(idx == 0), strategy


def test_max_and_min_are_exact():
    rng = np.random.default_rng(1)
    b, c, m = 64, 7, 3
    policy = rng.normal(size=(b, c)) * 20
    ref = rng.normal(size=(b, c)) * 20
    valid = rng.uniform(size=(b, c)) > 0.25
    valid[:, 0] = True
    valid[:, 1:4] = True
    reward = np.where(valid, policy - ref, np.nan)
    reward[:, 0] = np.nan  # y0 excluded by default
    for strategy in ("max", "min"):
        idx = np.asarray(kernel.select_negatives(jax.random.key(0), jnp.asarray(policy), jnp.asarray(ref),
                                                 beta=0.3, num_negatives=m, strategy=strategy,
                                                 valid=jnp.asarray(valid)))
        for row in range(b):
            eligible = np.flatnonzero(~np.isnan(reward[row]))
            order = eligible[np.argsort(reward[row, eligible])]
            expected = order[::-1][:m] if strategy == "max" else order[:m]
            np.testing.assert_array_equal(idx[row], expected)


def test_random_is_uniform_over_valid_candidates():
    idx = _select(jax.random.key(2), num_negatives=1, strategy="random")
    freq = np.bincount(idx[:, 0], minlength=6) / DRAWS
    expected = np.where(VALID & (np.arange(6) > 0), 1 / 4, 0.0)
    assert np.max(np.abs(freq - expected)) < 0.01, freq


def test_beta_sharpens_the_kernel():
    """beta -> 0 makes MC uniform (RNCE); large beta concentrates on the highest-reward candidate (Max)."""
    low = _select(jax.random.key(4), n=4000, num_negatives=1, beta=1e-6, include_preferred=False)
    freq = np.bincount(low[:, 0], minlength=6) / 4000
    assert np.max(np.abs(freq - np.where(VALID & (np.arange(6) > 0), 0.25, 0))) < 0.03
    high = _select(jax.random.key(4), n=4000, num_negatives=1, beta=50.0, include_preferred=False)
    best = _select(jax.random.key(0), n=1, num_negatives=1, strategy="max")[0, 0]
    assert np.all(high[:, 0] == best)


def test_deterministic_for_a_key_and_jit_compatible():
    policy, ref, valid = _tiled(64)
    kw = dict(beta=BETA, num_negatives=2, valid=valid)
    a = kernel.select_negatives(jax.random.key(7), policy, ref, **kw)
    b = kernel.select_negatives(jax.random.key(7), policy, ref, **kw)
    c = jax.jit(lambda k, p, r: kernel.select_negatives(k, p, r, **kw))(jax.random.key(7), policy, ref)
    d = kernel.select_negatives(jax.random.key(8), policy, ref, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(d))


def test_reference_free_weights_use_policy_logps():
    policy = jnp.asarray([[0.0, -1.0, -3.0]])
    w = np.asarray(kernel.weights(policy, None, beta=1.0, include_preferred=False))
    np.testing.assert_allclose(w[0], [0.0, 1 / (1 + np.exp(-2)), np.exp(-2) / (1 + np.exp(-2))], rtol=1e-6)
    z = 1 + np.exp(-1) + np.exp(-3)  # the default: Algorithm 1's w_0..w_L
    np.testing.assert_allclose(np.asarray(kernel.weights(policy, None, beta=1.0))[0],
                               [1 / z, np.exp(-1) / z, np.exp(-3) / z], rtol=1e-6)


def test_default_is_algorithm_1_for_mc_only():
    """By default the MC kernel samples z ~ Categorical(w_0..w_L), y0 included (Algorithm 1); Max / Min / random
    pick among the candidates (Fig. 2, the DPO baseline)."""
    idx = _select(jax.random.key(0), num_negatives=1)
    freq = np.bincount(idx[:, 0], minlength=6) / DRAWS
    assert np.max(np.abs(freq - _softmax_np(True))) < 0.01 and freq[0] > 0.1
    for strategy in ("random", "max", "min"):
        assert not np.any(_select(jax.random.key(1), n=2000, num_negatives=1, strategy=strategy) == 0), strategy
    assert kernel.preferred_eligible("mc") and not kernel.preferred_eligible("random")
    assert not kernel.preferred_eligible("mc", False) and kernel.preferred_eligible("max", True)


def test_errors():
    valid = np.ones((5, 4), bool)
    valid[3, 2:] = False
    kernel.check_enough_candidates(valid, 1)
    with pytest.raises(ValueError, match="row 3 has 1 eligible"):
        kernel.check_enough_candidates(valid, 2)
    kernel.check_enough_candidates(valid, 2, include_preferred=True)
    p = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="unknown kernel strategy 'best'.*mc"):
        kernel.select_negatives(jax.random.key(0), p, None, beta=1.0, num_negatives=1, strategy="best")
    with pytest.raises(ValueError, match="num_negatives=4"):  # 3 candidates, y0 excluded
        kernel.select_negatives(jax.random.key(0), p, None, beta=1.0, num_negatives=4, include_preferred=False)
    with pytest.raises(ValueError, match="num_negatives=5.*y0 included"):  # Algorithm 1: 4 columns eligible
        kernel.select_negatives(jax.random.key(0), p, None, beta=1.0, num_negatives=5)


@pytest.mark.parametrize("strategy", ["max", "min"])
def test_max_min_break_ties_uniformly_at_random(strategy):
    """At step 0 every log-ratio is 0: Max and Min must not both start on the first (best remaining) column.
    20 000 rows of 5 equal eligible candidates (one invalid column, never chosen): the chi-square statistic
    of the first pick's frequencies against uniform has 4 degrees of freedom (0.1% critical value 18.47);
    with M = 2 every unordered pair of the 10 is equally likely (9 dof, 27.88)."""
    n, c = 20_000, 7
    zeros = jnp.zeros((n, c))
    valid = np.ones((n, c), bool)
    valid[:, 4] = False
    for m, pairs in ((1, False), (2, True)):
        idx = np.asarray(kernel.select_negatives(jax.random.key(11), zeros, zeros, beta=1.0, num_negatives=m,
                                                 strategy=strategy, valid=jnp.asarray(valid)))
        assert not np.any(idx == 0) and not np.any(idx == 4)
        if not pairs:
            counts = np.bincount(idx[:, 0], minlength=c)[[1, 2, 3, 5, 6]]
            critical = 18.47
        else:
            keys = np.sort(idx, axis=1) @ np.array([c, 1])
            combos = [a * c + b for a, b in itertools.combinations([1, 2, 3, 5, 6], 2)]
            counts = np.array([np.sum(keys == k) for k in combos])
            assert counts.sum() == n
            critical = 27.88
        expected = n / len(counts)
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < critical, (m, counts, chi2)
    # the tie-break comes from the key: another key, other picks (and the same key, the same picks)
    a = kernel.select_negatives(jax.random.key(1), zeros[:64], None, beta=1.0, num_negatives=1, strategy=strategy)
    b = kernel.select_negatives(jax.random.key(2), zeros[:64], None, beta=1.0, num_negatives=1, strategy=strategy)
    a2 = kernel.select_negatives(jax.random.key(1), zeros[:64], None, beta=1.0, num_negatives=1, strategy=strategy)
    assert not np.array_equal(a, b) and np.array_equal(a, a2)


def test_max_min_without_ties_do_not_depend_on_the_key():
    policy, ref, valid = _tiled(32)
    for strategy in ("max", "min"):
        picks = [np.asarray(kernel.select_negatives(jax.random.key(k), policy, ref, beta=BETA, num_negatives=3,
                                                    strategy=strategy, valid=valid)) for k in range(5)]
        reward = np.where(VALID, np.nan_to_num(POLICY) - np.nan_to_num(REF, posinf=0), np.nan)[1:]
        order = 1 + np.argsort(np.where(np.isnan(reward), np.inf if strategy == "min" else -np.inf, reward))
        expected = order[::-1][:3] if strategy == "max" else order[:3]
        for p in picks:
            np.testing.assert_array_equal(p, np.tile(expected, (32, 1)))
