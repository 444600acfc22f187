"""Claim statistics against hand computations: paired CIs, verdict rules, TOST, combination."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.core.errors import ConfigError, InputError
from routelab.lab.claims.verdict import (
    INCONCLUSIVE,
    NOT_MEASURABLE,
    NOT_REPRODUCED,
    NOT_RUN,
    REPRODUCED,
    combine,
    judge,
    mean_ci,
)

T_975_DF2 = 4.302652729911275  # Student t quantile, 0.975, 2 degrees of freedom (tables)


def test_mean_ci_by_hand():
    mean, low, high = mean_ci([1.0, 2.0, 3.0], 0.95)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # sd 1, n 3
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))


def test_direction_verdicts():
    base = [5.0, 5.1, 4.9]
    assert judge("lower", [4.0, 4.1, 3.9], base).verdict == REPRODUCED       # differences -1, -1, -1
    assert judge("lower", [6.0, 6.05, 5.95], base).verdict == NOT_REPRODUCED
    assert judge("lower", [4.0, 5.6, 5.0], base).verdict == INCONCLUSIVE      # -1, +0.5, +0.1
    assert judge("higher", [6.0, 6.1, 5.9], base).verdict == REPRODUCED
    assert judge("lower", base, base).verdict == NOT_REPRODUCED               # identical: not lower
    result = judge("below", [1.7, 1.8, 1.6], 2.0)
    assert result.verdict == REPRODUCED and result.difference == pytest.approx(-0.3)
    assert judge("above", [0.5, 0.7, 0.6], 1.0).verdict == NOT_REPRODUCED


def test_noninferiority_uses_the_margin():
    base = [5.0, 5.0, 5.0]
    assert judge("noninferior", [5.01, 5.0, 5.005], base, margin=0.02).verdict == REPRODUCED
    assert judge("noninferior", [5.1, 5.12, 5.11], base, margin=0.02).verdict == NOT_REPRODUCED
    assert judge("noninferior", [5.0, 5.04, 4.99], base, margin=0.02).verdict == INCONCLUSIVE
    with pytest.raises(ConfigError, match="margin"):
        judge("noninferior", [1.0, 2.0], [1.0, 2.0])


def test_equivalence_is_the_paired_tost():
    base = [3.0, 3.1, 3.2]
    close = judge("equivalent", [3.01, 3.1, 3.21], base, margin=0.05)
    assert close.verdict == REPRODUCED and close.level == pytest.approx(0.9) and close.p_value < 0.05
    far = judge("equivalent", [3.5, 3.6, 3.71], base, margin=0.05)
    assert far.verdict == NOT_REPRODUCED
    assert judge("equivalent", [3.0, 3.2, 3.15], base, margin=0.05).verdict == INCONCLUSIVE


def test_bad_inputs():
    with pytest.raises(InputError, match="2 paired"):
        judge("lower", [1.0], [2.0])
    with pytest.raises(InputError, match="same seeds"):
        judge("lower", [1.0, 2.0], [2.0, 3.0, 4.0])
    with pytest.raises(ConfigError, match="kind"):
        judge("smaller", [1.0, 2.0], [2.0, 3.0])


def test_combine():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN]) == NOT_REPRODUCED
    assert combine([REPRODUCED, NOT_RUN]) == NOT_RUN
    assert combine([]) == NOT_RUN
    assert combine([REPRODUCED, NOT_MEASURABLE]) == NOT_MEASURABLE
    assert combine([NOT_MEASURABLE, NOT_RUN]) == NOT_RUN


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=6), st.floats(-3, 3, allow_nan=False))
def test_shifting_both_arms_changes_nothing(values, shift):
    a = [v + 0.1 * i for i, v in enumerate(values)]
    first = judge("lower", a, values)
    second = judge("lower", [v + shift for v in a], [v + shift for v in values])
    assert first.verdict == second.verdict
    assert first.difference == pytest.approx(second.difference, abs=1e-9)
    assert first.ci_low <= first.difference <= first.ci_high
