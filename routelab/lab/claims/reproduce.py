"""``routelab reproduce``: train the runs that the selected claims need (each once, resumable),
judge every check and write the claims table.

Run order: the main runs claim by claim, cheapest claim first (all seeds of a claim before
the next claim, so that an interrupted reproduction leaves whole claims measured), then
the budget-sweep runs. A finished run is never trained again, a partial one resumes from its
checkpoint. ``train=False`` only renders the table from the runs finished so far.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from routelab.core.run_lock import FolderLock
from routelab.lab.claims.budgets import Budget, get_budget
from routelab.lab.claims.measures import ON_DEMAND, on_demand_measure, run_measures
from routelab.lab.claims.pool import WorkerSetup, train_in_parallel
from routelab.lab.claims.registry import Check, Claim, get_claims
from routelab.lab.claims.runs import RUN_INFO, RunSpec, get_arm, resolved_settings, run_folder
from routelab.lab.claims.verdict import NOT_MEASURABLE, NOT_RUN, CheckResult, combine, judge
from routelab.lab.config import CorpusSettings, ModelSettings, TrainConfig
from routelab.lab.data import PreparedCorpus, prepare_corpus
from routelab.lab.train import RunFiles, train_run


def claim_order(claims: Sequence[Claim]) -> list[Claim]:
    """Claims in training order: repeatedly the one that needs the fewest arms not yet
    trained, on ties the one whose new arms serve the most other claims (then registry
    order), so that an interrupted reproduction has completed as many claims as possible."""
    remaining, order, trained = list(claims), [], set()

    def cost(claim: Claim) -> tuple[int, int]:
        new = set(claim.arms) - trained
        return len(new), -sum(1 for other in claims if other is not claim and new & set(other.arms))

    while remaining:
        cheapest = min(remaining, key=cost)
        order.append(cheapest)
        trained |= set(cheapest.arms)
        remaining.remove(cheapest)
    return order


def planned_runs(claims: Sequence[Claim], budget: Budget, *, sweep: bool = True) -> list[RunSpec]:
    """The runs of ``claims`` in training order (``claim_order``; all seeds of a claim before
    the next claim; the budget sweep last), each once."""
    specs: list[RunSpec] = []
    for claim in claim_order(claims):
        for seed in budget.seeds:
            specs += [RunSpec(arm, budget.steps, seed) for arm in claim.arms]
    if sweep:
        for steps in budget.sweep_steps:
            for claim in claims:
                for check in claim.checks:
                    if check.sweep:
                        specs += [RunSpec(arm, steps, seed) for seed in budget.seeds for arm in check.arms]
    return list(dict.fromkeys(specs))


@dataclass
class CheckRow:
    claim: Claim
    check: Check
    steps: int
    result: CheckResult | None
    arm_mean: float | None = None
    baseline_mean: float | None = None
    seeds_done: int = 0
    reason: str = ""
    measurable: bool = True

    @property
    def verdict(self) -> str:
        if self.result is not None:
            return self.result.verdict
        return NOT_RUN if self.measurable else NOT_MEASURABLE


@dataclass
class Reproduction:
    """What ``reproduce`` found: the rows of the main table, the sweep rows and the timings."""

    budget: Budget
    claims: list[Claim]
    rows: list[CheckRow]
    sweep_rows: list[CheckRow]
    runs_total: int
    runs_finished: int
    trained_now: int
    wall_time_s: float
    train_time_s: float
    report: Path | None = None
    selector: str = "all"
    seed_noise: tuple[float, int, int] | None = None  # pooled val-loss std over seeds, its dof, the arms pooled

    def claim_verdict(self, claim: Claim) -> str:
        return combine([r.verdict for r in self.rows if r.claim is claim])


class Runner:
    """Maps run specs to folders (by config hash), trains them, and reads their metrics."""

    def __init__(self, budget: Budget, corpus: PreparedCorpus, out: Path, corpus_overrides: dict[str, Any],
                 cache_dir: str | Path | None = None) -> None:
        self.budget, self.corpus, self.out, self.corpus_overrides = budget, corpus, out, corpus_overrides
        self.cache_dir = cache_dir  # where the corpus cache is (worker processes read it from there)
        self._measures: dict[RunSpec, dict[str, Any] | None] = {}

    def settings(self, spec: RunSpec) -> dict[str, Any]:
        return resolved_settings(spec, self.budget, self.corpus_overrides)

    def folder(self, spec: RunSpec) -> Path:
        return run_folder(self.out, self.settings(spec), self.corpus.meta["content_hash"])

    def finished(self, spec: RunSpec) -> bool:
        return RunFiles(self.folder(spec)).finished()

    def train(self, spec: RunSpec, console: Console, show_progress: bool,
              on_step_end: Callable[[int], None] | None = None) -> dict[str, Any]:
        settings = self.settings(spec)
        folder = self.folder(spec)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"arm": spec.arm, "steps": spec.steps, "seed": spec.seed, "budget": self.budget.name,
                **{k: v for k, v in settings.items() if k != "identity"}}
        (folder / RUN_INFO).write_text(json.dumps(info, indent=1, default=str))
        model = ModelSettings(**settings["model"])
        model_config = model.tinylm(vocab_size=self.corpus.vocab_size, max_seq_len=settings["train"]["seq_len"],
                                    router=settings["router"], router_options=settings["options"])
        return train_run(folder, self.corpus, model_config, TrainConfig(**settings["train"]), resume=True,
                         console=console, show_progress=show_progress, label=spec.label, on_step_end=on_step_end)

    def metric(self, spec: RunSpec, name: str) -> float | None:
        """One metric of a finished run (None when it is not finished): a ``run_measures``
        column, or an ``ON_DEMAND`` measurement made now and cached."""
        measures = self.measures(spec)
        if measures is None:
            return None
        if name in ON_DEMAND:
            return on_demand_measure(self.folder(spec), name)
        return measures.get(name)

    def measures(self, spec: RunSpec) -> dict[str, Any] | None:
        if spec not in self._measures:
            folder = self.folder(spec)
            finished = RunFiles(folder).finished()
            self._measures[spec] = run_measures(folder, spec.arm, get_arm(spec.arm).router, spec.seed) if finished else None
        return self._measures[spec]


def open_runner(budget_name: str, corpus_overrides: dict[str, Any], cache_dir: str | Path | None,
                out: str | Path) -> Runner:
    """The budget's corpus (prepared, or read from its cache) and a ``Runner`` writing to ``out``."""
    budget = get_budget(budget_name)
    corpus = prepare_corpus(CorpusSettings(**{**budget.corpus, **corpus_overrides}).options(), cache_dir=cache_dir)
    return Runner(budget, corpus, Path(out), corpus_overrides, cache_dir)


def evaluate_check(runner: Runner, claim: Claim, check: Check, steps: int, seeds: Sequence[int]) -> CheckRow:
    """Judge ``check`` on the runs with ``steps`` steps (rows lacking runs are 'not yet run')."""
    values: dict[str, list[float]] = {arm: [] for arm in check.arms}
    done = 0
    for seed in seeds:
        specs = [RunSpec(arm, steps, seed) for arm in check.arms]
        if any(runner.measures(spec) is None for spec in specs):
            continue
        metric = [runner.metric(spec, check.metric) for spec in specs]
        if any(v is None or not np.isfinite(v) for v in metric):
            return CheckRow(claim, check, steps, None, reason=f"{check.metric} is not defined for these runs",
                            measurable=False)
        done += 1
        for arm, value in zip(check.arms, metric):
            values[arm].append(float(value))
    row = CheckRow(claim, check, steps, None, seeds_done=done)
    if done < len(seeds):
        row.reason = f"{done}/{len(seeds)} seeds finished"
        return row
    row.arm_mean = float(np.mean(values[check.arm]))
    if check.baseline is not None:
        row.baseline_mean = float(np.mean(values[check.baseline]))
        reference: list[float] | float = values[check.baseline]
    else:
        reference = float(check.threshold)
    row.result = judge(check.kind, values[check.arm], reference, check.margin)
    return row


def seed_noise(runner: Runner, claims: Sequence[Claim]) -> tuple[float, int, int] | None:
    """Std of one run's validation loss across seeds, pooled over the causal-LM arms whose
    main runs have finished for every seed: ``(sigma, degrees of freedom, arms)``. The
    masked-diffusion arms are left out: their loss is another quantity (the diffusion ELBO)
    with its own noise, and the demo this sigma serves trains causal LMs."""
    budget = runner.budget
    total, dof, arms = 0.0, 0, 0
    causal = [a for c in claims for a in c.arms if "objective" not in get_arm(a).model]
    for arm in dict.fromkeys(causal):
        values = [m.get("val_loss") for m in (runner.measures(RunSpec(arm, budget.steps, s)) for s in budget.seeds) if m]
        if len(values) == len(budget.seeds) >= 2 and all(v is not None for v in values):
            total += float(np.var(values, ddof=1)) * (len(values) - 1)
            dof += len(values) - 1
            arms += 1
    return (math.sqrt(total / dof), dof, arms) if dof else None


def train_runs(runner: Runner, todo: Sequence[RunSpec], jobs: int, threads_per_job: int, console: Console,
               show_progress: bool) -> int:
    """Train ``todo`` one after the other, or on ``jobs`` worker processes; return how many."""
    if jobs > 1:
        setup = WorkerSetup(runner.budget.name, runner.corpus_overrides, None if runner.cache_dir is None
                            else str(runner.cache_dir), str(runner.out), threads_per_job)
        return train_in_parallel(setup, todo, jobs, console, show_progress, runner.folder)
    start = time.perf_counter()
    for index, spec in enumerate(todo):
        elapsed = time.perf_counter() - start
        eta = f", about {elapsed / index * (len(todo) - index) / 60:.0f} min left" if index else ""
        resuming = RunFiles(runner.folder(spec)).checkpoint.is_file()
        console.print(f"[{index + 1}/{len(todo)}] {spec.label}{' (resuming)' if resuming else ''}"
                      f" -> {runner.folder(spec).name}{eta}")
        runner.train(spec, console, show_progress)
    return len(todo)


def reproduce(
    selector: str = "all",
    budget_name: str = "default",
    *,
    out: str | Path = "runs/claims",
    corpus_source: str | None = None,
    cache_dir: str | Path | None = None,
    train: bool = True,
    sweep: bool = True,
    report: str | Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    jobs: int = 1,
    threads_per_job: int = 1,
) -> Reproduction:
    """Train what the claims need (unless ``train=False``), judge them and write the report.

    The report (``<out>/claims-<budget>.md`` unless ``report`` names another file) holds the
    claims table, the budget sweep and the run list. With ``jobs`` > 1 the runs train in
    that many worker processes of ``threads_per_job`` intra-op threads each
    (``routelab.lab.claims.pool``); the results are the same as one after the other.
    """
    console = console or Console(stderr=True)
    start = time.perf_counter()
    budget = get_budget(budget_name)
    claims = get_claims(selector)
    overrides = {"source": corpus_source} if corpus_source else {}
    with console.status("preparing the corpus and tokenizer ..."):
        runner = open_runner(budget.name, overrides, cache_dir, out)
    out = runner.out
    specs = planned_runs(claims, budget, sweep=sweep)
    for spec in specs:  # validate every setting before any training
        runner.settings(spec)
    finished_before = sum(runner.finished(s) for s in specs)
    todo = [s for s in specs if not runner.finished(s)] if train else []
    jobs = max(1, min(jobs, len(todo))) if todo else 1
    at_once = f", {jobs} at a time with {threads_per_job} thread(s) each" if jobs > 1 else ""
    console.print(f"routelab reproduce {selector} --budget {budget.name}: {len(specs)} runs "
                  f"({finished_before} finished, {len(specs) - finished_before} to train{at_once}) in {out}/")
    trained = 0
    train_start = time.perf_counter()
    with FolderLock(out, "claims folder") if todo else contextlib.nullcontext():
        trained = train_runs(runner, todo, jobs, threads_per_job, console, show_progress)
    train_time = time.perf_counter() - train_start
    rows = [evaluate_check(runner, claim, check, budget.steps, budget.seeds)
            for claim in claims for check in claim.checks]
    sweep_rows = [
        evaluate_check(runner, claim, check, steps, budget.seeds)
        for claim in claims for check in claim.checks if check.sweep and sweep for steps in budget.sweep_steps
    ]
    result = Reproduction(budget, claims, rows, sweep_rows, len(specs), sum(runner.finished(s) for s in specs), trained,
                          time.perf_counter() - start, train_time, selector=selector,
                          seed_noise=seed_noise(runner, claims))
    from routelab.lab.claims.report import write_report

    path = Path(report) if report is not None else out / f"claims-{budget.name}.md"
    result.report = write_report(result, runner, path)
    return result
