"""Equivalence testing of two routers' results over seeds: two one-sided tests (TOST).

Schuirmann 1987, "A comparison of the two one-sided tests procedure and the power approach
for assessing the equivalence of average bioavailability"; used to call routers
equivalent within a margin in "Equifinality in MoE routing" (arXiv 2604.14419).

With ``d = mean(a) - mean(b)`` and margin ``m > 0`` the two null hypotheses are
``d <= -m`` and ``d >= m``; each is tested with a one-sided t test and the TOST p-value
is the larger of the two. Equivalence is claimed at level ``alpha`` when
``p < alpha``, which is the same as the ``1 - 2 alpha`` confidence interval of ``d``
lying inside ``(-m, m)``. Welch's unequal-variance test is the default; Student's pooled
test and a paired test (same seeds on both sides) are available.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from routelab.core.errors import ConfigError, InputError

TOST_TESTS = ("welch", "student", "paired")


@dataclass(frozen=True)
class TOSTResult:
    """Result of a TOST: the difference, both one-sided tests, the p-value and the CI."""

    difference: float
    margin: float
    alpha: float
    test: str
    df: float
    standard_error: float
    t_lower: float
    t_upper: float
    p_lower: float
    p_upper: float
    p_value: float
    ci_low: float
    ci_high: float
    equivalent: bool

    def to_dict(self) -> dict[str, float | bool | str]:
        return asdict(self)


def _samples(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < 2:
        raise InputError(f"{name} needs at least 2 values (one per seed) for a TOST, got {array.size}.")
    if not np.isfinite(array).all():
        raise InputError(f"{name} holds NaN/Inf values: {array.tolist()}.")
    return array


def tost(
    a: Sequence[float], b: Sequence[float], margin: float, *, alpha: float = 0.05, test: str = "welch"
) -> TOSTResult:
    """Two one-sided tests of ``|mean(a) - mean(b)| < margin``.

    Args:
        a, b: one value per seed (e.g. final validation loss of a router and of the baseline).
        margin: equivalence margin ``m > 0``, in the units of the values.
        alpha: level of each one-sided test.
        test: ``welch`` (unequal variances), ``student`` (pooled variance) or ``paired``
            (``a[i]`` and ``b[i]`` share seed ``i``).
    """
    if not margin > 0 or math.isinf(margin):
        raise ConfigError(f"margin must be a finite number > 0, got {margin}.")
    if not 0 < alpha < 0.5:
        raise ConfigError(f"alpha must lie in (0, 0.5), got {alpha}.")
    if test not in TOST_TESTS:
        raise ConfigError(f"test={test!r} must be one of {TOST_TESTS}.")
    x, y = _samples(a, "a"), _samples(b, "b")
    if test == "paired":
        if x.size != y.size:
            raise InputError(f"a paired TOST needs as many values in a ({x.size}) as in b ({y.size}).")
        diffs = x - y
        difference = float(diffs.mean())
        se = float(diffs.std(ddof=1) / math.sqrt(diffs.size))
        df = float(diffs.size - 1)
    elif test == "student":
        difference = float(x.mean() - y.mean())
        pooled = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
        se = float(math.sqrt(pooled * (1 / x.size + 1 / y.size)))
        df = float(x.size + y.size - 2)
    else:
        difference = float(x.mean() - y.mean())
        vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
        se = float(math.sqrt(vx + vy))
        df = float((vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))) if se > 0 else float(x.size + y.size - 2)
    if se == 0.0:  # no spread at all: the difference is known exactly
        inside = abs(difference) < margin
        t_lower = math.inf if difference > -margin else -math.inf
        t_upper = -math.inf if difference < margin else math.inf
        p_lower = 0.0 if difference > -margin else 1.0
        p_upper = 0.0 if difference < margin else 1.0
        return TOSTResult(difference, margin, alpha, test, df, 0.0, t_lower, t_upper, p_lower, p_upper,
                          0.0 if inside else 1.0, difference, difference, inside)
    t_lower = (difference + margin) / se
    t_upper = (difference - margin) / se
    p_lower = float(stats.t.sf(t_lower, df))
    p_upper = float(stats.t.cdf(t_upper, df))
    p_value = max(p_lower, p_upper)
    half_width = float(stats.t.ppf(1 - alpha, df)) * se
    return TOSTResult(
        difference, margin, alpha, test, df, se, t_lower, t_upper, p_lower, p_upper, p_value,
        difference - half_width, difference + half_width, p_value < alpha,
    )
