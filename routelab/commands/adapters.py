"""``routelab adapters``: adapter-routing methods (level 2) and the adapter lab comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from routelab.commands.lab import apply_threads, output_console
from routelab.core.errors import ConfigError
from routelab.core.json_files import read_json
from routelab.core.run_lock import FolderLock

adapters_app = typer.Typer(help="Adapter routing (level 2): LoRA experts routed per token or per task.",
                           no_args_is_help=True)


def list_command() -> None:
    """Every adapter-routing method and its paper."""
    from routelab.adapters import list_methods

    table = Table(title="adapter-routing methods (attach_adapters(method=...))")
    for column in ("method", "routes by", "what", "paper"):
        table.add_column(column)
    for method in list_methods():
        table.add_row(method.name, "task" if method.needs_tasks else "token", escape(method.description), escape(method.paper))
    output_console().print(table)


def compare_command(
    config_file: Optional[Path] = typer.Argument(None, help="Settings file (.yaml/.yml/.toml); flags override it."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default runs/adapters; runs/adapters-smoke with --smoke)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated subset of the lab's methods."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="'default' or a folder of text files (one sub-folder per domain)."),
    smoke: bool = typer.Option(False, "--smoke", help="A tiny budget (seconds): checks the pipeline, not a result."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    threads: Optional[str] = typer.Option(None, "--threads", help="torch intra-op threads (an integer or 'auto')."),
) -> None:
    """Frozen base TinyLM, per-task LoRA experts, and every method on held-in vs held-out tasks (report + plots).

    Rerunning the same command continues where it stopped (finished stages are kept)."""
    from routelab.lab.adapter_lab import AdapterLabConfig, run_adapter_lab, smoke_config
    from routelab.lab.config import validated
    from routelab.lab.experiment import read_config_file

    apply_threads(threads)
    data: dict[str, Any] = read_config_file(config_file) if config_file is not None else {}
    if smoke:
        data = {**smoke_config(out or "runs/adapters-smoke").model_dump(), **data}
    if out is not None:
        data["out"] = out
    if methods is not None:
        data["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
        if not data["methods"]:
            raise ConfigError(f"--methods {methods!r} names nothing; give comma-separated methods (routelab adapters list).")
    if corpus is not None:
        if corpus != "default" and not Path(corpus).expanduser().exists():
            raise ConfigError(f"--corpus {corpus!r} does not exist; give 'default' or a folder of text files.")
        data.setdefault("corpus", {})["source"] = corpus
    config = validated(AdapterLabConfig, data, "adapter lab settings").check()
    stored = Path(config.out) / "config.json"
    if stored.is_file():
        previous = {k: v for k, v in read_json(stored, "adapter-lab config").items() if k != "methods"}
        current = {k: v for k, v in config.model_dump().items() if k != "methods"}
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise ConfigError(f"{config.out!r} holds a comparison with other settings ({', '.join(changed)}); "
                              "rerun with the same settings to continue it, or choose another --out.")
    with FolderLock(config.out, "adapter-lab folder"):
        result = run_adapter_lab(config, show_progress=not no_progress)
    console = output_console()
    console.print(Path(result["report"]).read_text(), markup=False, highlight=False)
    console.print(f"report: {result['report']}")


def register(app: typer.Typer) -> None:
    adapters_app.command("list")(list_command)
    adapters_app.command("compare")(compare_command)
    app.add_typer(adapters_app, name="adapters")
