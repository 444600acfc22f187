"""``routelab depth list`` (the depth methods) and ``routelab depth arank`` (gamma-MoD's
layer selection by attention rank on a trained checkpoint)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


depth_app = typer.Typer(help="Depth routing (level 3): list the methods; gamma-MoD layer selection by ARank.",
                        no_args_is_help=True)


@depth_app.command("list")
def list_command() -> None:
    """Every depth method: paper, options, FFN kind and how it decodes with a KV cache."""
    from routelab.depth import list_depth_methods

    table = Table(title="routelab depth methods (routelab train --depth-router NAME --depth-option KEY=VALUE)")
    for column in ("name", "paper", "ffn", "options", "decoding with a KV cache"):
        table.add_column(column, overflow="fold")
    for method in list_depth_methods():
        table.add_row(method.name, method.paper, method.ffn, ", ".join(method.options()), method.generation)
    Console(width=200).print(table)


@depth_app.command("arank")
def arank_command(
    checkpoint: Path = typer.Argument(..., help="A TinyLM checkpoint (model.pt) of a trained run."),
    layers: int = typer.Option(2, "--layers", help="How many low-ARank layers to route."),
    sequences: int = typer.Option(8, "--sequences", help="Calibration sequences from the run's validation split."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per calibration sequence."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Prepared-corpus cache of the run."),
) -> None:
    """ARank of every layer on validation text and the layers gamma-MoD would route."""
    import numpy as np
    import torch

    from routelab.commands.diagnostics import load_checkpoint, training_validation_split
    from routelab.core.errors import ConfigError
    from routelab.depth import arank_per_layer, select_layers_by_arank

    model, _, _ = load_checkpoint(checkpoint)
    if seq_len > model.config.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}.")
    if not 1 <= layers <= model.config.n_layers:
        raise ConfigError(f"--layers must be in 1..{model.config.n_layers}, got {layers}.")
    _, _, batches, _ = training_validation_split(checkpoint, seq_len, cache_dir)
    rows = [torch.as_tensor(np.asarray(ids, dtype=np.int64)) for _, ids in batches if len(ids) == seq_len][:sequences]
    if not rows:
        raise ConfigError(f"the validation split has no sequence of {seq_len} tokens; lower --seq-len.")
    ranks = arank_per_layer(model.eval(), torch.stack(rows))
    chosen = select_layers_by_arank(ranks, layers)
    table = Table(title=f"ARank on {len(rows)} validation sequences of {seq_len} tokens")
    table.add_column("layer", justify="right")
    table.add_column("ARank", justify="right")
    table.add_column("gamma-MoD routes it")
    for index, rank in enumerate(ranks):
        table.add_row(str(index), f"{rank:.2f}", "yes" if index in chosen else "")
    Console().print(table)
    Console().print(f"train with: --depth-router gamma-mod --depth-option layers={chosen}")


def register(app: typer.Typer) -> None:
    app.add_typer(depth_app, name="depth")
