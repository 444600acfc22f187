"""The claims table (markdown, and a rich table for the terminal)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from routelab.lab.claims.verdict import NOT_REPRODUCED, NOT_RUN, REPRODUCED

if TYPE_CHECKING:
    from routelab.lab.claims.reproduce import CheckRow, Reproduction, Runner

VERDICT_MARK = {REPRODUCED: "reproduced", NOT_REPRODUCED: "**not reproduced**"}


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def ours(row: CheckRow) -> str:
    """Mean of the arm (and of its baseline or the threshold) over seeds."""
    if row.result is None:
        return row.reason or "-"
    check = row.check
    if check.baseline is not None:
        return f"{check.metric}: {check.arm} {fmt(row.arm_mean)} vs {check.baseline} {fmt(row.baseline_mean)}"
    return f"{check.metric}: {check.arm} {fmt(row.arm_mean)} (threshold {fmt(check.threshold)})"


def difference(row: CheckRow) -> str:
    if row.result is None:
        return "-"
    r = row.result
    extra = f", margin {fmt(row.check.margin, 3)}" if row.check.margin is not None else ""
    return f"{fmt(r.difference)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}] ({r.level:.0%} CI, n={r.n}{extra})"


def render_markdown(result: Reproduction, runner: Runner) -> str:
    budget = result.budget
    lines = [
        f"# Claims re-measured at budget `{budget.name}`",
        "",
        f"Budget: {budget.description}. Model: {budget.model}. Training: {budget.train}. "
        f"Corpus: {runner.corpus.meta['source']!r}, vocabulary {runner.corpus.vocab_size}, content hash "
        f"`{runner.corpus.meta['content_hash'][:12]}`.",
        "",
        f"Runs: {result.runs_finished} of {result.runs_total} finished "
        f"({result.trained_now} trained by this command, {result.train_time_s / 60:.1f} min of training; "
        f"wall time {result.wall_time_s / 60:.1f} min).",
        "",
        "## Claims",
        "",
        "| # | claim | paper | verdict | command |",
        "|---|---|---|---|---|",
    ]
    for claim in result.claims:
        verdict = result.claim_verdict(claim)
        label = claim.statement + (" *(prediction of the cost model, not a measurement)*" if claim.prediction else "")
        lines.append(f"| {claim.id} | {label} | {claim.paper} | {VERDICT_MARK.get(verdict, verdict)} | "
                     f"`routelab reproduce {claim.id} --budget {budget.name}` |")
    lines += [
        "",
        "## Checks",
        "",
        "Difference = arm minus baseline (or minus the threshold), paired by seed, mean over seeds with its "
        "confidence interval; lower loss and lower MaxVio are better.",
        "",
        "| check | what is tested | paper's number | ours (mean over seeds) | difference [CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        lines.append(f"| {row.check.label} | {row.check.statement} | {row.check.paper} | {ours(row)} | "
                     f"{difference(row)} | {VERDICT_MARK.get(row.verdict, row.verdict)} |")
    if result.seed_noise is not None:
        sigma, dof, arms = result.seed_noise
        lines += ["", f"Seed noise: the validation loss of one run varies across seeds with a standard deviation of "
                  f"{sigma:.4f} nats (pooled over {arms} causal-LM arms, {dof} degrees of freedom)."]
    notes = [(c.id, c.note) for c in result.claims if c.note]
    if notes:
        lines += ["", "Notes:", ""] + [f"- claim {cid}: {note}" for cid, note in notes]
    if result.sweep_rows:
        lines += [
            "",
            "## Budget sweep",
            "",
            f"The checks that may flip with training length, at {', '.join(str(s) for s in budget.sweep_steps)} steps "
            "(same model, schedule and seeds; the learning-rate schedule is stretched to each length).",
            "",
            "| check | steps | ours (mean over seeds) | difference [CI] | verdict |",
            "|---|---|---|---|---|",
        ]
        for row in result.sweep_rows:
            lines.append(f"| {row.check.label} {row.check.statement} | {row.steps} | {ours(row)} | {difference(row)} | "
                         f"{VERDICT_MARK.get(row.verdict, row.verdict)} |")
    lines += ["", "## Runs", "", "| arm | router | description |", "|---|---|---|"]
    from routelab.lab.claims.runs import get_arm

    arms = list(dict.fromkeys(a for c in result.claims for a in c.arms))
    for key in arms:
        arm = get_arm(key)
        extra = f" options {arm.options}" if arm.options else ""
        extra += f" model {arm.model}" if arm.model else ""
        lines.append(f"| {key} | `{arm.router}`{extra} | {arm.description} |")
    lines += ["", f"Run folders are named by the hash of their full settings under `{runner.out}/`; each holds "
              "`claim_run.json` (its settings) and `claim_metrics.json` (the metrics used here)."]
    return "\n".join(lines) + "\n"


def write_report(result: Reproduction, runner: Runner, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_markdown(result, runner))
    tmp.replace(path)
    return path


def summary_table(result: Reproduction) -> Table:
    """The per-check verdicts for the terminal."""
    table = Table(title=f"claims at budget {result.budget.name}")
    for column in ("check", "what is tested", "difference [CI]", "verdict"):
        table.add_column(column)
    for row in result.rows:
        table.add_row(row.check.label, row.check.statement, difference(row) if row.result else (row.reason or "-"),
                      row.verdict)
    return table
