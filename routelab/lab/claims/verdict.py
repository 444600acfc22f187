"""The statistics of a claim check: paired differences over seeds, their confidence interval,
and a verdict.

Every check compares paired values (the same seed trains both arms, on the same data) or
one arm's values with a fixed threshold. With ``d_i`` the per-seed differences (arm minus
baseline, or arm minus threshold), ``n`` seeds, mean ``d`` and standard error
``s / sqrt(n)``, the two-sided ``level`` confidence interval is ``d +- t_{n-1} se``
(Student's t). Verdicts:

* ``lower`` / ``higher`` (the arm is better in that direction): reproduced when the 95% CI
  lies entirely on the claimed side of 0, not reproduced when it lies entirely on the other
  side (0 included), else inconclusive.
* ``noninferior`` (lower is better; at most ``margin`` worse): reproduced when the 95% CI's
  upper end is below ``margin``, not reproduced when its lower end is at or above ``margin``.
* ``equivalent``: the paired TOST of ``routelab.lab.equivalence.tost`` (Schuirmann 1987) at level
  0.05, i.e. the 90% CI inside ``(-margin, margin)``: reproduced; the 90% CI entirely
  outside: not reproduced; else inconclusive.
* ``below`` / ``above``: the one-sample form of lower / higher against ``threshold``.

A claim with several checks is reproduced when all are, not reproduced when any is not,
not yet run while a check lacks its runs, not measurable when a check's metric is undefined
for these runs (e.g. a cache-size knee with too few experts), else inconclusive. With fewer
than two seeds nothing can be concluded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from routelab.core.errors import ConfigError, InputError
from routelab.lab.equivalence import tost

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at this budget"
NOT_RUN = "not yet run"
NOT_MEASURABLE = "not measurable at this budget"
KINDS = ("lower", "higher", "noninferior", "equivalent", "below", "above")
DIRECTION_LEVEL = 0.95
TOST_ALPHA = 0.05


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: the mean difference, its CI (at ``level``) and the verdict."""

    kind: str
    n: int
    difference: float
    ci_low: float
    ci_high: float
    level: float
    verdict: str
    p_value: float | None = None


def mean_ci(differences: Sequence[float], level: float) -> tuple[float, float, float]:
    """Mean of ``differences`` and its two-sided Student-t confidence interval at ``level``."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise InputError(f"a confidence interval needs at least 2 paired values (seeds), got {d.size}.")
    if not np.isfinite(d).all():
        raise InputError(f"the differences hold NaN/Inf values: {d.tolist()}.")
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * se
    return mean, mean - half, mean + half


def _side(low: float, high: float, claimed_negative: bool) -> str:
    if claimed_negative:
        return REPRODUCED if high < 0 else NOT_REPRODUCED if low >= 0 else INCONCLUSIVE
    return REPRODUCED if low > 0 else NOT_REPRODUCED if high <= 0 else INCONCLUSIVE


def judge(
    kind: str, arm: Sequence[float], reference: Sequence[float] | float, margin: float | None = None
) -> CheckResult:
    """Judge one check. ``reference`` is the baseline's per-seed values (paired with ``arm``)
    or, for ``below``/``above``, the threshold."""
    if kind not in KINDS:
        raise ConfigError(f"check kind {kind!r} must be one of {KINDS}.")
    a = np.asarray(arm, dtype=np.float64)
    if kind in ("below", "above"):
        b = np.full_like(a, float(reference))
    else:
        b = np.asarray(reference, dtype=np.float64)
        if b.shape != a.shape:
            raise InputError(f"paired values need the same seeds on both sides, got {a.size} and {b.size} values.")
    if kind in ("noninferior", "equivalent") and not (margin is not None and margin > 0):
        raise ConfigError(f"a {kind!r} check needs a margin > 0, got {margin}.")
    if kind == "equivalent":
        result = tost(a, b, margin, alpha=TOST_ALPHA, test="paired")
        outside = result.ci_low >= margin or result.ci_high <= -margin
        verdict = REPRODUCED if result.equivalent else NOT_REPRODUCED if outside else INCONCLUSIVE
        return CheckResult(kind, a.size, result.difference, result.ci_low, result.ci_high, 1 - 2 * TOST_ALPHA,
                           verdict, result.p_value)
    mean, low, high = mean_ci(a - b, DIRECTION_LEVEL)
    if kind == "noninferior":
        verdict = REPRODUCED if high < margin else NOT_REPRODUCED if low >= margin else INCONCLUSIVE
    else:
        verdict = _side(low, high, claimed_negative=kind in ("lower", "below"))
    return CheckResult(kind, a.size, mean, low, high, DIRECTION_LEVEL, verdict)


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a claim from those of its checks."""
    if not verdicts:
        return NOT_RUN
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    if NOT_RUN in verdicts:
        return NOT_RUN
    if NOT_MEASURABLE in verdicts:
        return NOT_MEASURABLE
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE
