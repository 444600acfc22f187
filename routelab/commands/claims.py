"""``routelab claims list`` and ``routelab reproduce CLAIM|all``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from routelab.commands.common import parse_int_list
from routelab.core.errors import ConfigError
from routelab.commands.lab import CACHE, NO_PROGRESS, apply_threads, err_console, output_console

claims_app = typer.Typer(help="The papers' claims that `routelab reproduce` re-measures.", no_args_is_help=True)


@claims_app.command("list")
def list_command(
    budget: str = typer.Option("default", "--budget", help="Budget whose runs are counted: smoke, default or long."),
) -> None:
    """List every claim with its paper, checks and the runs it needs at a budget."""
    from routelab.lab.claims import CLAIMS, get_budget, planned_runs

    chosen = get_budget(budget)
    table = Table(title=f"claims (runs at budget {chosen.name}: {chosen.steps} steps x {len(chosen.seeds)} seeds)")
    for column in ("#", "name", "claim", "paper", "checks", "runs"):
        table.add_column(column, overflow="fold")
    for claim in CLAIMS:
        checks = "\n".join(f"{c.label} {c.kind}: {c.statement}" for c in claim.checks)
        runs = len(planned_runs([claim], chosen))
        label = claim.statement + (" (prediction)" if claim.prediction else "")
        table.add_row(claim.id, claim.name, label, claim.paper, checks, str(runs))
    output_console().print(table)
    total = len(planned_runs(list(CLAIMS), chosen))
    output_console().print(f"`routelab reproduce all --budget {chosen.name}` trains {total} runs "
                           "(runs shared between claims are trained once).")


def job_count_of(text: str) -> int:
    """``--jobs``: one positive integer."""
    values = parse_int_list(text, "--jobs", minimum=1) or []
    if len(values) != 1:
        raise ConfigError(f"--jobs {text!r} must be one positive integer or 'auto'.")
    return values[0]


def reproduce_command(
    claim: str = typer.Argument(..., help="A claim id (1-10), a claim name (routelab claims list) or 'all'."),
    budget: str = typer.Option("default", "--budget", help="smoke (machinery check), default or long."),
    out: Path = typer.Option(Path("runs/claims"), "--out", help="Folder of the run folders and the report."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the claims table here "
                                          "(default: <out>/claims-<budget>.md)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text folder or file instead of the default corpus."),
    no_train: bool = typer.Option(False, "--no-train", help="Only render the table from the runs finished so far."),
    no_sweep: bool = typer.Option(False, "--no-sweep", help="Skip the budget-sweep runs."),
    cache_dir: Optional[Path] = CACHE,
    no_progress: bool = NO_PROGRESS,
    threads: str = typer.Option("auto", "--threads", help="Intra-op threads in all: a number, or 'auto' (idle cores)."),
    jobs: str = typer.Option("auto", "--jobs", help="Runs trained at once, each in its own process with an equal "
                             "share of --threads: a number, or 'auto' (one per thread; 2 runs at 1 thread train "
                             "1.3x faster than 1 run at 2 threads on a 2-core machine)."),
) -> None:
    """Re-measure a claim (or all): train the runs it needs once (resumable), judge it, write the table."""
    from routelab.lab.claims import get_budget, get_claims, reproduce
    from routelab.lab.claims.report import summary_table

    get_budget(budget)
    get_claims(claim)
    apply_threads(threads)
    import torch

    total_threads = torch.get_num_threads()
    job_count = total_threads if jobs == "auto" else job_count_of(jobs)
    start = time.perf_counter()
    try:
        result = reproduce(claim, budget, out=out, corpus_source=corpus, cache_dir=cache_dir, train=not no_train,
                           sweep=not no_sweep, report=report, console=err_console, show_progress=not no_progress,
                           jobs=job_count, threads_per_job=max(1, total_threads // job_count))
    except KeyboardInterrupt:
        err_console.print("[yellow]stopped; finished runs are kept and the ones in training have a checkpoint: run "
                          "the same command again to continue.[/]")
        raise typer.Exit(130) from None
    console = output_console()
    console.print(summary_table(result))
    for item in result.claims:
        console.print(f"claim {item.id} ({item.name}): {result.claim_verdict(item)}")
    console.print(f"{result.runs_finished}/{result.runs_total} runs finished; wall time "
                  f"{(time.perf_counter() - start) / 60:.1f} min. Table: {result.report}")


def register(app: typer.Typer) -> None:
    app.add_typer(claims_app, name="claims")
    app.command("reproduce")(reproduce_command)
