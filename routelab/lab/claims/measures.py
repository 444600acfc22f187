"""The metrics of a finished run that claims test, cached in the run folder.

Every column of ``routelab compare`` (``routelab.lab.run_metrics``: ``val_loss``,
``max_vio_final``, ``active_experts_per_token``, ``sch_2k``, ``llep_speedup``, ...) plus:

* ``max_vio_first10``: the per-batch MaxVio of the first 10 training steps (mean over
  steps and MoE layers): balance from the first step;
* ``cache_knee``: on the segment-cache hit-rate curve (SCH, look-ahead 16, mean over
  layers) of the validation routing, the gain per cache slot from ``k`` to ``2k`` minus the
  gain per slot from ``2k`` to ``E`` (``k`` = active experts per token): positive when the
  curve levels off after twice the active experts;
* ``llep_measured_speedup`` (computed only for the checks that ask for it: it runs two
  processes for about half a minute): standard-EP over LLEP time of a forward + backward
  of every MoE layer, measured with real expert parallelism (2 gloo processes, one thread
  each) replaying the run's final validation routing (``routelab.parallel.replay_timing``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from routelab.lab.run_metrics import RunRecord, run_columns, validation_trace

MEASURES_FILE = "claim_metrics.json"
MEASURES_VERSION = 1
FIRST_STEPS = 10


def max_vio_first_steps(record: RunRecord, steps: int = FIRST_STEPS) -> float | None:
    values = [float(np.mean(r["max_vio"])) for r in record.train_rows if r.get("max_vio") and r["step"] <= steps]
    return float(np.mean(values)) if values else None


def cache_knee(record: RunRecord) -> float | None:
    from routelab.metrics.locality import active_experts, segment_cache_hit_rates

    trace = validation_trace(record)
    if trace is None:
        return None
    k = active_experts(trace)
    experts = trace.num_experts
    if 2 * k >= experts:
        return None
    curves = segment_cache_hit_rates(trace, future_lens=[16], baselines=[], level="layer", sequence_stride=1)
    curves = [c for c in curves if c.policy == "sch"]
    at = lambda size: float(np.mean([c.at(size) for c in curves]))  # noqa: E731
    return (at(2 * k) - at(k)) / k - (at(experts) - at(2 * k)) / (experts - 2 * k)


def run_measures(folder: str | Path, arm: str, router: str, seed: int) -> dict[str, Any]:
    """All metrics of the finished run in ``folder`` (computed once, then read from its cache file)."""
    folder = Path(folder)
    cache = folder / MEASURES_FILE
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("version") == MEASURES_VERSION:
            return data["metrics"]
    record = RunRecord.load(arm, router, seed, folder)
    metrics: dict[str, Any] = dict(run_columns(record))
    metrics["max_vio_first10"] = max_vio_first_steps(record)
    metrics["cache_knee"] = cache_knee(record)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # another reproduce may render at the same time
    tmp.write_text(json.dumps({"version": MEASURES_VERSION, "metrics": metrics}, indent=1))
    tmp.replace(cache)
    return metrics


MEASURED_FILE = "claim_measured.json"
MEASURED_VERSION = 1


def llep_measured_speedup(folder: Path) -> dict[str, Any] | None:
    """Real EP=2 standard / LLEP step time on the run's validation routing (whole of it)."""
    from routelab.parallel.replay_timing import ReplayShape, llep_step_speedup

    routing = folder / "val_routing.npz"
    if not routing.is_file():
        return None
    model = json.loads((folder / "config.json").read_text())["model_config"]
    if model.get("ffn", "moe") != "moe":
        return None
    topk_idx_LTK = np.load(routing)["topk_idx"]
    shape = ReplayShape(model["d_model"], model["expert_d_hidden"], model["num_experts"], model["top_k"])
    return llep_step_speedup(topk_idx_LTK, shape, world=2, tokens=topk_idx_LTK.shape[1], rounds=7)


ON_DEMAND = {"llep_measured_speedup": llep_measured_speedup}


def on_demand_measure(folder: str | Path, metric: str) -> float | None:
    """A metric of ``ON_DEMAND`` for the finished run in ``folder``, measured once and cached
    (with its details) in ``claim_measured.json``."""
    folder = Path(folder)
    cache = folder / MEASURED_FILE
    data = json.loads(cache.read_text()) if cache.is_file() else {}
    if data.get("version") != MEASURED_VERSION:
        data = {"version": MEASURED_VERSION, "metrics": {}}
    if metric not in data["metrics"]:
        details = ON_DEMAND[metric](folder)
        data["metrics"][metric] = details
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float))
        tmp.replace(cache)
    details = data["metrics"][metric]
    return None if details is None else float(details["speedup"])
