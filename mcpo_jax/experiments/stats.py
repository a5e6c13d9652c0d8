"""Paired tests for head-to-head comparisons of two policies on the same prompts.

* ``sign_test(wins, losses)``: the exact two-sided binomial test of H0 "a non-tied prompt is equally likely to
  go either way" (ties are dropped, the usual sign test).
* ``paired_bootstrap(a, b)``: per-prompt scores of two policies (e.g. 1 / 0.5 / 0 against the start policy,
  averaged over seeds), resampled by prompt: the mean difference, its percentile CI and a two-sided p-value
  (the fraction of resampled differences, centred on the observed one, at least as far from 0 as it is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def binomial_two_sided_p(k: int, n: int) -> float:
    """P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2), exactly (1.0 for n = 0)."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail) if 2 * low != n else 1.0


def sign_test(wins: int, losses: int) -> float:
    return binomial_two_sided_p(int(wins), int(wins) + int(losses))


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
