"""Which leaderboard differences are within seed noise.

Two routers' mean validation losses over ``n`` seeds each differ by seed noise alone with
a standard deviation of about ``sigma * sqrt(2 / n)``, where ``sigma`` is the standard
deviation of one run's validation loss across seeds. A gap to the leader smaller than
twice that (about a 95 % band) is marked as within noise. ``sigma`` is pooled over the
routers of the experiment that have two or more seeds; an experiment with one seed uses a
reference ``sigma`` measured at the same settings (the demo's comes from
``routelab reproduce all --budget default``, which trains the demo's model with three seeds),
or marks nothing when it has none. Same-seed runs of different routers share their data
order, so the band is conservative for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BAND_WIDTH = 2.0
WITHIN_NOISE_MARK = "≈"


@dataclass(frozen=True)
class NoiseBand:
    """``band``: gaps to the leader below it are within seed noise; ``sigma`` and where it came from."""

    sigma: float
    seeds: int
    band: float
    source: str

    def describe(self) -> str:
        return (f"{WITHIN_NOISE_MARK} = within seed noise: gap to #1 below {self.band:.4f} nats "
                f"(2 x sigma x sqrt(2/{self.seeds}), sigma = {self.sigma:.4f}, {self.source})")


def pooled_std(aggregates: list[dict[str, Any]], column: str = "val_loss") -> tuple[float, int] | None:
    """Pooled sample std of ``column`` over routers with >= 2 seeds, and its degrees of freedom."""
    total, dof = 0.0, 0
    for agg in aggregates:
        std, seeds = agg.get(f"{column}_std"), agg.get("seeds", 0)
        if isinstance(std, (int, float)) and math.isfinite(std) and seeds >= 2:
            total += (seeds - 1) * std**2
            dof += seeds - 1
    return (math.sqrt(total / dof), dof) if dof else None


def noise_band(aggregates: list[dict[str, Any]], reference_sigma: float | None = None) -> NoiseBand | None:
    """The seed-noise band of a leaderboard (None when no sigma is known)."""
    if not aggregates:
        return None
    seeds = min(int(a.get("seeds", 1)) for a in aggregates)
    pooled = pooled_std(aggregates)
    if pooled is not None:
        sigma, source = pooled[0], f"pooled over this experiment's seeds ({pooled[1]} degrees of freedom)"
    elif reference_sigma is not None:
        sigma, source = reference_sigma, "reference value for these settings"
    else:
        return None
    return NoiseBand(sigma, seeds, BAND_WIDTH * sigma * math.sqrt(2 / seeds), source)


def gap_label(agg: dict[str, Any], best: dict[str, Any], band: NoiseBand | None) -> str:
    """``"-"`` for the leader, else the gap in validation loss, marked when within noise."""
    if agg is best:
        return "-"
    mean, top = agg.get("val_loss_mean"), best.get("val_loss_mean")
    if not isinstance(mean, (int, float)) or not isinstance(top, (int, float)):
        return "-"
    gap = mean - top
    return f"+{gap:.4f}" + (f" {WITHIN_NOISE_MARK}" if band is not None and gap < band.band else "")
