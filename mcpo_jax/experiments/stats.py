"""Tests for comparisons of trained policies, with the seed as the unit of inference.

A run's randomness is its seed (SFT start, data, order, kernel draws): prompts judged for one seed are not
independent replications of the method, so every primary test works on per-seed numbers.

* ``sign_flip_p(d)``: the exact permutation test of H0 "each seed's difference is symmetric about 0": the
  observed mean against the means of all 2^n sign flips of the per-seed differences (Monte Carlo above 20 seeds).
* ``paired_t(d)``: the paired t-test on the same per-seed differences (normal-theory companion).
* ``hierarchical_bootstrap(D)``: a [seeds, prompts] matrix of per-prompt differences resampled over seeds, then
  over prompts within each drawn seed: a CI that carries both sources of variance.
* ``holm(ps)``: Holm's step-down adjustment over a family of pre-declared primary hypotheses.
* ``sign_test(wins, losses)``: the exact binomial test on pooled prompt verdicts (ties dropped); exact for any n
  (integer arithmetic). Pooled over seeds it treats prompts x seeds as independent: descriptive only.
* ``paired_bootstrap(a, b)``: per-prompt scores resampled by prompt (descriptive; no seed variance).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

ALTERNATIVES = ("two-sided", "greater", "less")


def _binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly: integer sums, one correctly rounded division."""
    term, total = 1, 0
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return total / (1 << n)  # int / int: correctly rounded, no float overflow for any n


def binomial_two_sided_p(k: int, n: int) -> float:
    """P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2), exactly (1.0 for n = 0)."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    if 2 * low == n:
        return 1.0
    return min(1.0, 2.0 * _binomial_tail(low, n))


def sign_test(wins: int, losses: int) -> float:
    return binomial_two_sided_p(int(wins), int(wins) + int(losses))


def _pvalue(null: np.ndarray, observed: float, alternative: str) -> float:
    eps = 1e-12 * max(1.0, abs(observed))
    if alternative == "greater":
        return float(np.mean(null >= observed - eps))
    if alternative == "less":
        return float(np.mean(null <= observed + eps))
    return float(np.mean(np.abs(null) >= abs(observed) - eps))


def sign_flip_p(d: Sequence[float], *, alternative: str = "two-sided", exact_max: int = 20,
                num_samples: int = 200_000, seed: int = 0) -> float:
    """Permutation p-value of the mean of per-seed differences `d` under random sign flips (exact: all 2^n
    flips, the observed one included, when n <= exact_max; else `num_samples` random flips plus the observed)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}; known: {ALTERNATIVES}")
    d = np.asarray(d, float)
    if d.size == 0:
        return float("nan")
    obs = float(d.mean())
    if d.size <= exact_max:
        signs = np.asarray(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        rng = np.random.default_rng(seed)
        signs = np.concatenate([np.ones((1, d.size)), rng.choice((1.0, -1.0), size=(num_samples, d.size))])
    return _pvalue((signs * d).mean(axis=1), obs, alternative)


def paired_t(d: Sequence[float], *, alternative: str = "two-sided") -> dict:
    """Paired t-test of mean(d) = 0 over seeds: {"mean", "t", "df", "p", "ci_low", "ci_high"} (95% t interval)."""
    from scipy import stats as sps

    d = np.asarray(d, float)
    n = d.size
    if n < 2:
        return {"mean": float(d.mean()) if n else float("nan"), "t": float("nan"), "df": n - 1, "p": float("nan"),
                "ci_low": float("nan"), "ci_high": float("nan")}
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    half = float(sps.t.ppf(0.975, n - 1)) * se
    if se == 0:
        t, p = (math.copysign(math.inf, m) if m else 0.0), (0.0 if m else 1.0)
        if alternative != "two-sided" and (m > 0) != (alternative == "greater"):
            p = 1.0
    else:
        t = m / se
        p = {"two-sided": 2 * sps.t.sf(abs(t), n - 1), "greater": sps.t.sf(t, n - 1),
             "less": sps.t.cdf(t, n - 1)}[alternative]
    return {"mean": m, "t": float(t), "df": n - 1, "p": float(p), "ci_low": m - half, "ci_high": m + half}


def hierarchical_bootstrap(D: np.ndarray, *, num_samples: int = 10_000, confidence: float = 0.95,
                           seed: int = 0) -> dict:
    """Mean of a [S seeds, P prompts] matrix of per-prompt differences, resampled over seeds then prompts
    (NaNs ignored): {"diff", "ci_low", "ci_high", "n_seeds", "n_prompts"}."""
    D = np.asarray(D, float)
    if D.ndim != 2 or D.size == 0:
        raise ValueError(f"expected a [seeds, prompts] matrix, got shape {D.shape}")
    s, p = D.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, (num_samples, s))
    prompts = rng.integers(0, p, (num_samples, s, p))
    means = np.nanmean(D[seeds[..., None], prompts], axis=(1, 2)) if num_samples * s * p <= 5e7 else np.asarray(
        [np.nanmean(D[seeds[i][:, None], prompts[i]]) for i in range(num_samples)])
    alpha = (1.0 - confidence) / 2
    return {"diff": float(np.nanmean(np.nanmean(D, axis=1))), "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1 - alpha)), "n_seeds": s, "n_prompts": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): p_(i) * (m - i + 1), made monotone, capped at 1."""
    p = np.asarray(pvalues, float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, num_samples: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    a_n, b_n = np.asarray(a, float), np.asarray(b, float)
    if a_n.shape != b_n.shape or a_n.ndim != 1:
        raise ValueError(f"paired scores must be two equal-length vectors, got {a_n.shape} and {b_n.shape}")
    d = a_n - b_n
    n = d.size
    if n == 0:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, (num_samples, n))].mean(axis=1)
    obs = float(d.mean())
    alpha = (1.0 - confidence) / 2
    p = float(np.mean(np.abs(means - obs) >= abs(obs) - 1e-12)) if np.any(d != d[0]) else (0.0 if obs else 1.0)
    return {"diff": obs, "ci_low": float(np.quantile(means, alpha)), "ci_high": float(np.quantile(means, 1 - alpha)),
            "p": p, "n": int(n)}


def format_p(p: float) -> str:
    if p != p:
        return "—"
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"
