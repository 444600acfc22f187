"""Per-run metric columns of ``routelab compare``: a registry of functions over a finished run.

A run metric is ``fn(run: RunRecord) -> dict[str, float | None]``; every key becomes a
column of the results table (``None`` when it does not apply, e.g. balance for a dense
model). New columns (for example serving metrics computed from the saved probe routing
or the final checkpoint) are added with ``@register_run_metric("name")`` and appear in
every later comparison without changing ``compare``.

Definitions of the built-in columns:

* ``val_loss``, ``val_ppl``, ``val_loss_<domain>``: final evaluation on the fixed validation set;
* ``max_vio_avg``: mean over logged training steps of the per-batch MaxVio (averaged over
  MoE layers); ``max_vio_final``, ``cv_final``: MaxVio / CV of the expert loads summed over
  the whole validation set at the final evaluation (mean over layers);
* ``dead_experts_final``: experts that received no token on the validation set (summed over
  layers); ``drop_rate_final``: dropped / selected assignments; ``active_experts_per_token``:
  routed experts per token (mean over layers);
* ``fluctuation_mean`` / ``fluctuation_final``: fraction of (probe token, layer) pairs whose
  selected expert set changed between consecutive evaluations, averaged over the run / at
  the last evaluation;
* ``tokens_per_s``: training tokens per second of optimizer-step time (evaluation excluded);
* ``sch_2k``, ``lru_hit_2k``, ``lru_serving_hit_2k``, ``ep_max_mean``, ``ep_max_mean_llep``,
  ``llep_speedup``: ``routelab.systems.summary.serving_summary`` of the routing of the whole
  validation set at the final evaluation (``val_routing.npz``): segment-cache hit rates at a
  cache of twice the active experts and the expert-parallel load model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from routelab.core.json_files import read_json
from routelab.core.registry import Registry
from routelab.lab.train import read_metrics

MetricValues = dict[str, float | None]
RunMetricFn = Callable[["RunRecord"], MetricValues]


@dataclass
class RunRecord:
    """A finished run as the metric functions see it.

    Attributes:
        key: the router's label in the experiment; router: its preset (or ``dense``).
        seed: the run's seed; folder: the run folder (holds ``model.pt``,
        ``probe_routing.npz``, ``metrics.jsonl``, ``summary.json``).
    """

    key: str
    router: str
    seed: int
    folder: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.folder / "metrics.jsonl")

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "train"]

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "eval"]

    @property
    def final_eval(self) -> dict[str, Any]:
        return self.eval_rows[-1]

    @property
    def moe_layers(self) -> list[int]:
        """Layer index of each MoE layer (the order of per-layer lists in the metrics)."""
        return list(self.summary.get("moe_layers", []))

    def probe_routing(self) -> dict[str, np.ndarray]:
        """Arrays of ``probe_routing.npz`` (``topk_idx`` ``[evals, layers, tokens, slots]``, ...)."""
        with np.load(self.folder / "probe_routing.npz") as data:
            return {k: data[k] for k in data.files}

    @classmethod
    def load(cls, key: str, router: str, seed: int, folder: str | Path) -> RunRecord:
        folder = Path(folder)
        return cls(key, router, seed, folder, read_json(folder / "summary.json", "run summary"))


@dataclass(frozen=True)
class RunMetricInfo:
    name: str
    fn: RunMetricFn
    description: str


RUN_METRICS: Registry[RunMetricInfo] = Registry("run metric", "metric")


def register_run_metric(name: str, description: str = "") -> Callable[[RunMetricFn], RunMetricFn]:
    """Register ``fn(run) -> {column: value}`` as a column group of ``routelab compare``."""

    def decorate(fn: RunMetricFn) -> RunMetricFn:
        RUN_METRICS.add(name, RunMetricInfo(name, fn, description or (fn.__doc__ or "").strip()))
        return fn

    return decorate


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@register_run_metric("quality", "final validation loss, perplexity and loss per domain")
def quality_metrics(run: RunRecord) -> MetricValues:
    final = run.final_eval
    out: MetricValues = {"val_loss": final["val_loss"], "val_ppl": final["val_ppl"]}
    for domain, value in sorted(final.get("val_loss_by_domain", {}).items()):
        out[f"val_loss_{domain}"] = value
    return out


@register_run_metric("balance", "MaxVio (training average and final), CV, dead experts, drops, active experts")
def balance_metrics(run: RunRecord) -> MetricValues:
    final = run.final_eval
    if "max_vio" not in final:
        return dict.fromkeys(
            ("max_vio_avg", "max_vio_final", "cv_final", "dead_experts_final", "drop_rate_final",
             "active_experts_per_token")
        )
    per_step = [mean(r["max_vio"]) for r in run.train_rows if r.get("max_vio")]
    return {
        "max_vio_avg": mean([v for v in per_step if v is not None]),
        "max_vio_final": mean(final["max_vio"]),
        "cv_final": mean(final["cv"]),
        "dead_experts_final": float(sum(final["dead_experts"])),
        "drop_rate_final": mean(final["drop_rate"]),
        "active_experts_per_token": mean(final["active_experts_per_token"]),
    }


@register_run_metric("stability", "routing fluctuation of the probe batch between evaluations")
def stability_metrics(run: RunRecord) -> MetricValues:
    values = [r["routing_fluctuation"] for r in run.eval_rows if r.get("routing_fluctuation") is not None]
    if not values or "max_vio" not in run.final_eval:
        return {"fluctuation_mean": None, "fluctuation_final": None}
    return {"fluctuation_mean": mean(values), "fluctuation_final": values[-1]}


@register_run_metric("throughput", "training tokens per second and parameter counts")
def throughput_metrics(run: RunRecord) -> MetricValues:
    return {
        "tokens_per_s": run.summary.get("train_tokens_per_s"),
        "params_total": float(run.summary["params_total"]),
        "params_active": float(run.summary["params_active"]),
    }


SERVING_COLUMNS = ("sch_2k", "lru_hit_2k", "lru_serving_hit_2k", "ep_max_mean", "ep_max_mean_llep", "llep_speedup")


def validation_trace(run: RunRecord):  # noqa: ANN201 - returns an InMemoryTrace
    """The final validation routing of a run (``val_routing.npz``) as an in-memory trace, or None."""
    from routelab.traces.memory import InMemoryTrace

    path = run.folder / "val_routing.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        if "topk_idx" not in data.files:
            return None  # a dense model routes nothing
        token_ids = data["token_ids"]
        sequences, seq_len = token_ids.shape
        return InMemoryTrace.from_arrays(
            list(data["topk_idx"].astype(np.int64)),
            int(data["num_experts"]),
            topk_weight=list(data["topk_weight"]),
            seq_id=np.repeat(np.arange(sequences), seq_len),
            token_id=token_ids.reshape(-1),
            domain=data["domains"].reshape(-1).astype(np.int16),
            metadata={"router": run.router, "run": str(run.folder)},
        )


@register_run_metric("serving", "SCH and LRU hit rate at a cache of 2k experts, EP max/mean load with and without LLEP")
def serving_metrics(run: RunRecord) -> MetricValues:
    """``routelab.systems.summary.serving_summary`` of the final validation routing."""
    from routelab.systems.summary import serving_summary

    trace = validation_trace(run)
    if trace is None:
        return dict.fromkeys(SERVING_COLUMNS)
    summary = serving_summary(trace)
    return {key: float(summary[key]) for key in SERVING_COLUMNS}


def run_columns(run: RunRecord, metric_names: list[str] | None = None) -> MetricValues:
    """All registered (or the named) metric columns of one run."""
    names = metric_names if metric_names is not None else RUN_METRICS.names()
    out: MetricValues = {}
    for name in names:
        out.update(RUN_METRICS.get(name).fn(run))
    return out
