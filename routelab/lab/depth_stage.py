"""The lab's last step for depth-routed runs: the method's second training stage
(``routelab.depth.fit.fit_depth``: Duo-LLM routers from oracle paths, Dr.LLM routers from
MCTS paths, LFF forecasters) and its evaluation under every decision rule
(``mode_report``), both recorded in the final evaluation row and the run summary.

The second stage reads ``fit_batches`` training batches drawn after the last training
step (never seen in training); the mode report reads the first ``report_batches``
validation batches. Other ``depth_fit`` options go to the method's fit function (e.g.
``simulations`` for Dr.LLM, ``epochs``).
"""

from __future__ import annotations

from typing import Any

from routelab.depth.fit import fit_depth, mode_report
from routelab.lab.batches import Batch, TrainSampler

FIT_DEFAULTS = {"fit_batches": 4, "report_batches": 2, "drllm_simulations": 24}
LAB_FIT_DEFAULTS = {"drllm": {"simulations": 48}}


def finish_depth(model: Any, sampler: TrainSampler, val_set: list[Batch], last_step: int,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the depth method's second stage and evaluate every mode; returns what to record."""
    options = {**FIT_DEFAULTS, **LAB_FIT_DEFAULTS.get(model.depth.name, {}), **(options or {})}
    fit_batches, report_batches = int(options.pop("fit_batches")), int(options.pop("report_batches"))
    simulations = int(options.pop("drllm_simulations"))
    batches = [sampler.batch(last_step + 1 + i, 0) for i in range(fit_batches)]
    fit = fit_depth(model, batches, **options)
    modes = mode_report(model, val_set[:report_batches], drllm_simulations=simulations)
    return {"depth_fit": fit, "depth_modes": modes, "depth": model.depth.describe()}
