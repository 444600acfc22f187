"""Layer-wise expert budgets: how many experts (or how much capacity) each layer gets.

DynaMoE (Gülmez 2026, "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise
Adaptive Capacity", arXiv 2603.01697) gives every layer its own maximum number of active
experts ``K_l`` following one of six schedules over the depth position
``x = l / (L - 1)`` (``x = 0`` for a single layer):

* ``uniform``:          ``high`` everywhere;
* ``descending``:       linear from ``high`` (first layer) to ``low`` (last);
* ``ascending``:        linear from ``low`` to ``high``;
* ``pyramid``:          ``low`` at both ends, ``high`` at mid-depth (a tent);
* ``inverse-pyramid``:  ``high`` at both ends, ``low`` at mid-depth;
* ``wave``:             ``low + (high - low) * (1 + sin(2 pi c x)) / 2`` with ``c`` cycles.

The paper names uniform, descending, ascending, pyramid and wave; the sixth schedule
(inverse pyramid) and the exact shapes of pyramid and wave are a reconstruction [recon].

Use ``layer_top_k`` for integer ``k`` per layer (rounded half up, clamped to
``[low, high]``) and ``layer_capacity_factors`` for float capacity factors, e.g.::

    ks = layer_top_k("descending", num_layers=4, k_min=1, k_max=4)   # [4, 3, 2, 1]
    layers = [routelab.MoE(..., router="dynamoe", top_k=k) for k in ks]
"""

from __future__ import annotations

import math

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_positive_int

SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "inverse-pyramid", "wave")


def schedule_fraction(schedule: str, depth: float, *, wave_cycles: float = 1.0) -> float:
    """Where layer depth ``depth`` in [0, 1] sits between ``low`` (0) and ``high`` (1)."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "uniform":
        return 1.0
    if schedule == "descending":
        return 1.0 - depth
    if schedule == "ascending":
        return depth
    tent = 1.0 - abs(2.0 * depth - 1.0)
    if schedule == "pyramid":
        return tent
    if schedule == "inverse-pyramid":
        return 1.0 - tent
    return (1.0 + math.sin(2.0 * math.pi * wave_cycles * depth)) / 2.0


def layer_schedule(schedule: str, num_layers: int, low: float, high: float, *, wave_cycles: float = 1.0) -> list[float]:
    """The raw (float) budget of each of ``num_layers`` layers between ``low`` and ``high``."""
    num_layers = check_positive_int("num_layers", num_layers)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"the schedule needs finite low <= high, got low={low}, high={high}.")
    if not math.isfinite(float(wave_cycles)):
        raise ConfigError(f"wave_cycles must be finite, got {wave_cycles}.")
    values = []
    for layer in range(num_layers):
        depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
        values.append(low + (high - low) * schedule_fraction(schedule, depth, wave_cycles=wave_cycles))
    return values


def layer_top_k(schedule: str, num_layers: int, k_min: int, k_max: int, *, wave_cycles: float = 1.0) -> list[int]:
    """Experts per token ``K_l`` for each layer: the schedule rounded half up, in ``[k_min, k_max]``.

    Example: ``layer_top_k("descending", 4, 1, 4) == [4, 3, 2, 1]``.
    """
    k_min = check_positive_int("k_min", k_min)
    k_max = check_positive_int("k_max", k_max)
    if k_min > k_max:
        raise ConfigError(f"k_min={k_min} must be <= k_max={k_max}.")
    values = layer_schedule(schedule, num_layers, k_min, k_max, wave_cycles=wave_cycles)
    return [min(k_max, max(k_min, math.floor(v + 0.5))) for v in values]


def layer_capacity_factors(
    schedule: str, num_layers: int, low: float, high: float, *, wave_cycles: float = 1.0
) -> list[float]:
    """A capacity factor per layer (floats, for ``capacity_factor=``), following ``schedule``."""
    if not float(low) > 0:
        raise ConfigError(f"capacity factors must be > 0, got low={low}.")
    return layer_schedule(schedule, num_layers, low, high, wave_cycles=wave_cycles)
