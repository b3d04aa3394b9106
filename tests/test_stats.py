"""The report's statistics (METHOD.md §6b) against scipy and direct computations on fixture data."""

import math

import pytest
from scipy import stats as scipy_stats

from dinorankclip.report.stats import holm, mcnemar_exact, paired_t, t_interval

RUN = [0.512, 0.547, 0.498, 0.530, 0.521]
REFERENCE = [0.488, 0.511, 0.503, 0.497, 0.490]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_t_interval_equals_scipys(n):
    values = RUN[:n]
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=scipy_stats.tmean(values), scale=scipy_stats.sem(values))
    mean, half = t_interval(values)
    assert mean == pytest.approx((low + high) / 2, rel=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=1e-12)


def test_one_value_has_no_interval():
    mean, half = t_interval([0.25])
    assert mean == 0.25 and math.isnan(half)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_paired_t_equals_scipys_ttest_rel_and_its_interval(n):
    run, ref = RUN[:n], REFERENCE[:n]
    result = paired_t(run, ref)
    assert result.p == pytest.approx(scipy_stats.ttest_rel(run, ref).pvalue, rel=1e-12)
    differences = [a - b for a, b in zip(run, ref, strict=True)]
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=sum(differences) / n, scale=scipy_stats.sem(differences))
    assert result.difference == pytest.approx((low + high) / 2, rel=1e-12)
    assert result.half_width == pytest.approx((high - low) / 2, rel=1e-12)
    assert (result.seeds, result.test) == (n, "paired t")


def test_paired_t_on_one_seed_or_constant_differences():
    single = paired_t([0.6], [0.5])
    assert single.difference == pytest.approx(0.1) and math.isnan(single.p) and single.test == ""
    constant = paired_t([0.5, 0.6], [0.4, 0.5])  # identical non-zero differences: t is undefined, no claim
    assert constant.difference == pytest.approx(0.1) and constant.half_width == 0 and math.isnan(constant.p)
    assert paired_t([0.5, 0.6], [0.5, 0.6]).p == 1.0
    assert t_interval([0.1, 0.1, 0.1]) == (0.1, 0.0)


@pytest.mark.parametrize(("b", "c"), [(12, 0), (10, 2), (3, 2), (0, 0), (7, 9)])
def test_mcnemar_equals_a_direct_binomial_computation(b, c):
    """Items: b where only the run is right, c where only the reference is, and 20 where both agree."""
    run = [True] * b + [False] * c + [True] * 10 + [False] * 10
    reference = [False] * b + [True] * c + [True] * 10 + [False] * 10
    n, k = b + c, min(b, c)
    direct = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert mcnemar_exact(run, reference) == pytest.approx(direct, rel=1e-12)
    if n:
        assert direct == pytest.approx(scipy_stats.binomtest(b, n, 0.5).pvalue, rel=1e-9) or b == c


def test_mcnemar_refuses_different_items():
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([True, False], [True])


def test_holm_step_down_with_untested_entries():
    p = [0.01, math.nan, 0.04, 0.03, 0.005]
    adjusted = holm(p)
    # sorted: 0.005×4, 0.01×3, 0.03×2, 0.04×1, each at least the previous
    assert adjusted[4] == pytest.approx(0.02) and adjusted[0] == pytest.approx(0.03)
    assert adjusted[3] == pytest.approx(0.06) and adjusted[2] == pytest.approx(0.06)
    assert math.isnan(adjusted[1])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([0.2, 0.01]) == [0.2, 0.02] and holm([]) == []
