"""TOST equivalence tests: hand-computed answers (t with 2 degrees of freedom has a closed-form
CDF), agreement with scipy's one-sided t tests, and the confidence-interval duality."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from routelab.core.errors import ConfigError, InputError
from routelab.lab.equivalence import tost


def t2_cdf(t: float) -> float:
    """CDF of Student's t with 2 degrees of freedom: 1/2 + t / (2 sqrt(2 + t^2))."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_paired_known_answer():
    # differences [0.1, 0, -0.1]: mean 0, sd 0.1, se 0.1/sqrt(3), df 2
    a, b = [1.1, 1.0, 0.9], [1.0, 1.0, 1.0]
    result = tost(a, b, margin=0.1, test="paired")
    assert result.df == 2 and result.difference == pytest.approx(0.0, abs=1e-12)
    assert result.t_lower == pytest.approx(math.sqrt(3))
    assert result.p_value == pytest.approx(1 - t2_cdf(math.sqrt(3)))  # 0.112702
    assert result.p_value == pytest.approx(0.112702, abs=1e-6) and not result.equivalent
    wider = tost(a, b, margin=0.2, test="paired")
    assert wider.p_value == pytest.approx(1 - t2_cdf(2 * math.sqrt(3)))  # 0.037090
    assert wider.p_value == pytest.approx(0.037090, abs=1e-6) and wider.equivalent


def test_welch_known_answer():
    # n = 2 per side with equal variances 0.5: Welch df = 2, se = sqrt(0.25 + 0.25)
    result = tost([0.0, 1.0], [0.2, 1.2], margin=1.0, test="welch")
    assert result.df == pytest.approx(2.0)
    assert result.standard_error == pytest.approx(math.sqrt(0.5))
    assert result.difference == pytest.approx(-0.2)
    assert result.p_lower == pytest.approx(1 - t2_cdf(0.8 / math.sqrt(0.5)))  # 0.187652
    assert result.p_upper == pytest.approx(t2_cdf(-1.2 / math.sqrt(0.5)))  # 0.115892
    assert result.p_value == pytest.approx(0.187652, abs=1e-6) and not result.equivalent


@pytest.mark.parametrize("test", ["welch", "student", "paired"])
def test_agrees_with_scipy_one_sided_t_tests(test):
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 0.05, 5), rng.normal(3.01, 0.08, 5)
    margin = 0.1
    result = tost(a, b, margin, test=test)
    if test == "paired":
        lower = stats.ttest_rel(a + margin, b, alternative="greater").pvalue
        upper = stats.ttest_rel(a - margin, b, alternative="less").pvalue
    else:
        equal_var = test == "student"
        lower = stats.ttest_ind(a + margin, b, equal_var=equal_var, alternative="greater").pvalue
        upper = stats.ttest_ind(a - margin, b, equal_var=equal_var, alternative="less").pvalue
    assert result.p_lower == pytest.approx(lower, rel=1e-9)
    assert result.p_upper == pytest.approx(upper, rel=1e-9)
    assert result.p_value == pytest.approx(max(lower, upper), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    a=st.lists(st.floats(-10, 10), min_size=2, max_size=6),
    b=st.lists(st.floats(-10, 10), min_size=2, max_size=6),
    margin=st.floats(0.01, 5),
)
def test_equivalent_iff_ci_inside_margin(a, b, margin):
    result = tost(a, b, margin)
    if result.standard_error > 1e-9 and min(abs(result.ci_low + margin), abs(result.ci_high - margin)) > 1e-9:
        assert result.equivalent == (-margin < result.ci_low and result.ci_high < margin)
    assert 0.0 <= result.p_value <= 1.0


def test_identical_constant_samples():
    result = tost([2.0, 2.0], [2.0, 2.0], margin=0.1)
    assert result.equivalent and result.p_value == 0.0
    far = tost([2.0, 2.0], [3.0, 3.0], margin=0.1)
    assert not far.equivalent and far.p_value == 1.0


def test_errors():
    with pytest.raises(InputError, match="at least 2 values"):
        tost([1.0], [1.0, 2.0], 0.1)
    with pytest.raises(ConfigError, match="margin"):
        tost([1.0, 2.0], [1.0, 2.0], 0.0)
    with pytest.raises(InputError, match="paired"):
        tost([1.0, 2.0, 3.0], [1.0, 2.0], 0.1, test="paired")
    with pytest.raises(InputError, match="NaN"):
        tost([1.0, float("nan")], [1.0, 2.0], 0.1)
