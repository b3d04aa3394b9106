"""The statistics of the report (METHOD.md §6b): seed means with Student-t intervals, paired t-tests over seeds with
Holm's correction, and an exact McNemar test for a comparison that has one seed.

A bootstrap over seeds × test items would understate the seed variance (at 3 seeds × 400 items it rejected 7–25% of
true nulls), so intervals and tests are over seeds, the unit that was randomised. With one seed there is no interval,
and a comparison can only be conditional on the one trained model: McNemar on per-item correctness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval over `values` (df = n − 1); NaN half-width for one value."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    if min(values) == max(values):
        return values[0], 0.0
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)


class Comparison(NamedTuple):
    """run − reference: the mean difference, its interval's half-width (NaN where there is none), the p-value, how
    many seeds were paired, and the test that gave p ("paired t", "McNemar", or "" for no test)."""

    difference: float
    half_width: float
    p: float
    seeds: int
    test: str


def paired_t(run: Sequence[float], reference: Sequence[float]) -> Comparison:
    """The paired t-test over seeds (scipy's `ttest_rel`), with the t-interval of the per-seed differences."""
    differences = [a - b for a, b in zip(run, reference, strict=True)]
    mean, half = t_interval(differences)
    if len(differences) < 2:
        return Comparison(mean, math.nan, math.nan, len(differences), "")
    if all(d == differences[0] for d in differences):  # zero variance: no difference, or t is undefined
        return Comparison(mean, 0.0, 1.0 if mean == 0 else math.nan, len(differences),
                          "paired t" if mean == 0 else "none (identical differences: t undefined)")
    return Comparison(mean, half, float(stats.ttest_rel(run, reference).pvalue), len(differences), "paired t")


def mcnemar_exact(run_correct: Sequence[bool], reference_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value on per-item correctness of two models on the same items: a binomial test of the
    discordant pairs, p = min(1, 2·P(X ≤ min(b, c))), X ~ Bin(b + c, ½)."""
    if len(run_correct) != len(reference_correct):
        raise ValueError(f"McNemar needs the same items: {len(run_correct)} against {len(reference_correct)}")
    b = sum(1 for a, r in zip(run_correct, reference_correct, strict=True) if a and not r)
    c = sum(1 for a, r in zip(run_correct, reference_correct, strict=True) if r and not a)
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * float(stats.binom.cdf(min(b, c), b + c, 0.5)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries, comparisons without a test, are left out and stay NaN)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted
