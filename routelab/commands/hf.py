"""``routelab trace-hf``: trace the routing of a pretrained transformers MoE checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from routelab.core.errors import ConfigError, RoutelabError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TextSequence:
    domain: str
    token_ids: list[int]


def parse_corpus(spec: str) -> tuple[str, list[Path]]:
    """``[DOMAIN=]PATH`` -> (domain, text files); a folder gives its ``*.txt`` files, sorted."""
    domain, _, raw = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path = Path(raw)
    if not path.exists():
        raise ConfigError(f"--corpus {spec!r}: {str(path)!r} does not exist. Use [DOMAIN=]PATH to a text file or folder.")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"--corpus {spec!r}: the folder holds no .txt file.")
    return domain or path.stem, files


def corpus_sequences(corpora: list[str], tokenizer, seq_len: int, max_tokens: int | None) -> list[TextSequence]:  # noqa: ANN001
    """Tokenise every document and cut it into sequences of at most ``seq_len`` tokens."""
    sequences: list[TextSequence] = []
    total = 0
    for spec in corpora:
        domain, files = parse_corpus(spec)
        for path in files:
            ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
            for start in range(0, len(ids), seq_len):
                chunk = ids[start : start + seq_len]
                if max_tokens is not None:
                    chunk = chunk[: max(max_tokens - total, 0)]
                if chunk:
                    sequences.append(TextSequence(domain, list(chunk)))
                    total += len(chunk)
    if not sequences:
        raise ConfigError("the corpora hold no tokens to trace.")
    return sequences


def batches(
    sequences: list[TextSequence], start: int, batch_size: int, pad_id: int
) -> Iterator[tuple[int, list[TextSequence], torch.Tensor, torch.Tensor]]:
    """Right-padded ``(first index, sequences, input_ids, mask)`` batches from sequence ``start`` on."""
    import torch


    for first in range(start, len(sequences), batch_size):
        group = sequences[first : first + batch_size]
        width = max(len(s.token_ids) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.bool)
        for row, seq in enumerate(group):
            ids[row, : len(seq.token_ids)] = torch.tensor(seq.token_ids)
            mask[row, : len(seq.token_ids)] = True
        yield first, group, ids, mask


def run_trace_hf(
    model_path: str,
    corpora: list[str],
    out: Path,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    router: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    commit_every: int = 10,
    console: Console | None = None,
) -> Path:
    """Trace ``model_path`` over ``corpora`` into ``out`` (resumable); returns the trace path."""
    import torch

    from routelab.core.validation import check_positive_int
    from routelab.models.hf import HFRoutingSource, attach
    from routelab.models.hf.loading import load_pretrained, load_tokenizer
    from routelab.models.hf.recording import trace_metadata
    from routelab.traces import TraceRecorder, TraceWriter

    console = console or Console()
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch_size", batch_size)
    check_positive_int("commit_every", commit_every)
    if max_tokens is not None:
        check_positive_int("max_tokens", max_tokens)
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    sequences = corpus_sequences(corpora, tokenizer, seq_len, max_tokens)
    model = load_pretrained(model_path, dtype=dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    setup = {"checkpoint": str(model_path), "corpora": list(corpora), "seq_len": seq_len, "max_tokens": max_tokens,
             "replaced_router": router}
    with attach(model, track_load=False) as handle:
        if router is not None:
            handle.replace_router(router)
        if resume:
            writer = TraceWriter.resume(out)
            if writer.metadata.get("trace_setup") != setup:
                raise ConfigError(
                    f"--resume: {str(out)!r} was traced with {writer.metadata.get('trace_setup')}, not {setup}; "
                    "resume with the same arguments or start a new trace."
                )
            done = int((writer.resume_state or {}).get("sequences_done", 0))
        else:
            writer = TraceWriter(out, trace_metadata(handle, trace_setup=setup), handle.num_moe_layers,
                                 handle.num_experts, overwrite=overwrite)
            done = 0
        recorder = TraceRecorder(HFRoutingSource(handle), writer)
        columns = [TextColumn("[bold]tracing"), BarColumn(), MofNCompleteColumn(), TextColumn("sequences"),
                   TimeRemainingColumn()]
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("trace", total=len(sequences), completed=done)
                for count, (first, group, ids, mask) in enumerate(batches(sequences, done, batch_size, pad_id), 1):
                    seq_ids = torch.arange(first, first + len(group))
                    recorder.record(ids, None if bool(mask.all()) else mask, seq_ids_B=seq_ids,
                                    domains_B=[s.domain for s in group])
                    progress.advance(task, len(group))
                    if count % commit_every == 0:
                        writer.commit({"sequences_done": first + len(group)})
            writer.close()
        except BaseException:
            writer.abort()
            raise
    console.print(f"traced {sum(len(s.token_ids) for s in sequences)} tokens in {len(sequences)} sequences "
                  f"-> [bold]{out}[/bold]")
    return Path(out)


def summary_table(path: Path) -> Table:
    """Per-layer load balance of a trace (``routelab.metrics.layer_balance``)."""
    from routelab.metrics import layer_balance
    from routelab.traces import Trace

    trace = Trace.open(path)
    report = layer_balance(trace)
    model_layers = trace.metadata.get("model_layers", list(trace.layers))
    table = Table(title=f"{trace.metadata.get('model', '')}: {trace.num_tokens} tokens, {trace.num_experts} experts")
    for column in ("layer", "model layer", "MaxVio", "CV", "entropy", "dead experts"):
        table.add_column(column, justify="right")
    for i, layer in enumerate(report.layers):
        row = report.per_layer
        table.add_row(str(layer), str(model_layers[layer]), f"{row['max_vio'][i]:.3f}", f"{row['cv'][i]:.3f}",
                      f"{row['entropy'][i]:.3f}", f"{int(row['dead_experts'][i])}")
    return table


def trace_hf_command(
    model: str = typer.Argument(..., help="Checkpoint directory written by save_pretrained (or a name in the local HF cache)."),
    corpus: list[str] = typer.Option(..., "--corpus", help="[DOMAIN=]PATH: a text file or a folder of .txt files (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Trace directory to write (e.g. runs/olmoe/val.trace)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop after this many tokens."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: the checkpoint's)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    router: str | None = typer.Option(None, "--router", help="Replace every router by this preset (from the pretrained gate)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted trace from its last commit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace at --out."),
) -> None:
    """Trace the routing of a pretrained transformers MoE model (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V3, GPT-OSS)."""
    console = Console()
    try:
        path = run_trace_hf(model, corpus, out, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                            tokenizer_path=tokenizer, dtype=dtype, router=router, resume=resume, overwrite=overwrite,
                            console=console)
    except RoutelabError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    console.print(summary_table(path))


def register(app: typer.Typer) -> None:
    app.command("trace-hf")(trace_hf_command)
