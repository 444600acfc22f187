"""``routelab trace-hf``: trace the routing of a pretrained transformers MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table



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
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    commit_every: int = 16,
    console: Console | None = None,
) -> Path:
    """Trace ``model_path`` over ``corpora`` into ``out`` (resumable); returns the trace path.

    The corpus is read, cut and batched as by ``routelab trace`` (``routelab.traces.corpus``).
    """
    from routelab.core.validation import check_positive_int
    from routelab.models.hf import HFRoutingSource, attach
    from routelab.models.hf.loading import check_local_model, load_pretrained, load_tokenizer
    from routelab.models.hf.recording import trace_metadata
    from routelab.traces import TraceRecorder, TraceWriter
    from routelab.traces.corpus import (
        corpus_description,
        corpus_fingerprint,
        encoder_of,
        parse_corpus,
        record_corpus,
        token_sequences,
    )
    from routelab.traces.resume_check import check_resume_setup

    console = console or Console()
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch_size", batch_size)
    check_positive_int("commit_every", commit_every)
    if max_tokens is not None:
        check_positive_int("max_tokens", max_tokens)
    entries = parse_corpus(corpora)
    check_local_model(model_path)
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    model = load_pretrained(model_path, dtype=dtype).to(device)
    setup = {"checkpoint": str(model_path), "corpus": corpus_fingerprint(entries), "seq_len": seq_len,
             "batch_size": batch_size, "max_tokens": max_tokens, "dtype": dtype, "tokenizer": tokenizer_path,
             "replaced_router": router}
    with attach(model, track_load=False) as handle:
        if router is not None:
            handle.replace_router(router)
        if resume:
            check_resume_setup(out, setup)
            writer = TraceWriter.resume(out)
        else:
            metadata = trace_metadata(handle, trace_setup=setup, domain_names=[e.domain for e in entries],
                                      seq_len=seq_len, corpus=corpus_description(entries))
            writer = TraceWriter(out, metadata, handle.num_moe_layers, handle.num_experts, overwrite=overwrite)
        sequences = token_sequences(entries, encoder_of(tokenizer), seq_len)
        columns = [TextColumn("[bold]tracing"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TimeElapsedColumn()]
        with writer, Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("trace", total=max_tokens, completed=writer.num_tokens)
            tokens = record_corpus(TraceRecorder(HFRoutingSource(handle), writer), sequences, batch_size=batch_size,
                                   max_tokens=max_tokens, commit_every=commit_every,
                                   on_batch=lambda n: progress.advance(task, n), device=device)
    console.print(f"traced {tokens} tokens x {handle.num_moe_layers} MoE layers -> [bold]{out}[/bold]")
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
    seq_len: int = typer.Option(256, "--seq-len", min=1, help="Tokens per sequence."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Stop after this many tokens."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: the checkpoint's)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    router: str | None = typer.Option(None, "--router", help="Replace every router by this preset (from the pretrained gate)."),
    device: str = typer.Option("cpu", "--device", help="torch device to run the model on."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted trace from its last commit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace at --out."),
) -> None:
    """Trace the routing of a pretrained transformers MoE model (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V3, GPT-OSS)."""
    from routelab.commands.common import check_device, check_trace_target

    check_trace_target(out, resume=resume, overwrite=overwrite)
    check_device(device)
    trace_and_summarise(model, corpus, out, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                        tokenizer_path=tokenizer, dtype=dtype, router=router, device=device, resume=resume,
                        overwrite=overwrite)


def trace_and_summarise(model: str, corpus: list[str], out: Path, **options: object) -> None:
    """``run_trace_hf`` for the command line, then the per-layer balance of the trace
    (``routelab trace --hf`` and ``routelab trace-hf``)."""
    console = Console(stderr=True)
    path = run_trace_hf(model, corpus, out, console=console, **options)  # type: ignore[arg-type]
    Console().print(summary_table(path))


def register(app: typer.Typer) -> None:
    app.command("trace-hf")(trace_hf_command)
