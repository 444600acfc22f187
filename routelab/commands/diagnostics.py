"""``routelab trace``, ``routelab analyze`` and ``routelab simulate cache|ep|schedule``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from routelab.commands.common import check_at_least, check_device, check_trace_target, parse_int_list
from routelab.core.errors import ConfigError


def _open_trace(path: Path, max_tokens: int | None):  # noqa: ANN202
    from routelab.traces import Trace

    trace = Trace.open(path)
    return trace.select(max_tokens=max_tokens) if max_tokens is not None else trace


def _tokenizer_hash(tokenizer: Any) -> str | None:
    to_str = getattr(tokenizer, "to_str", None)
    if callable(to_str):
        return hashlib.sha256(to_str().encode()).hexdigest()[:16]
    return None


def load_checkpoint(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, metadata)`` of a TinyLM checkpoint, through the lab's loader."""
    try:
        from routelab.lab.checkpoint import load_model
    except ImportError as err:
        raise ConfigError(
            "`routelab trace CHECKPOINT` needs the training lab (routelab.lab.checkpoint.load_model), which this "
            "installation lacks. Record traces from Python with routelab.traces.TraceRecorder instead."
        ) from err
    return load_model(path)


def training_validation_split(
    checkpoint: Path, seq_len: int, cache_dir: Path | None = None
) -> tuple[list[dict[str, Any]], list[str], Any, int]:
    """Trace header entries, domain names, sequences and token count of the validation split
    the run of ``checkpoint`` was evaluated on (the corpus is re-prepared from the cache)."""
    from routelab.lab.run_corpus import run_corpus, split_sequences

    with Console(stderr=True).status("preparing the run's corpus ..."):
        prepared = run_corpus(checkpoint, cache_dir=cache_dir)
    description = [{"domain": d, "path": str(prepared.path), "split": "val", "content_hash": prepared.content_hash}
                   for d in prepared.domains]
    num_tokens = int(prepared.meta["num_tokens"]["val"])
    return description, list(prepared.domains), split_sequences(prepared, "val", seq_len), num_tokens


def trace_command(
    checkpoint: Path = typer.Argument(..., help="TinyLM checkpoint written by `routelab train`."),
    corpus: list[str] | None = typer.Option(
        None, "--corpus", help="[DOMAIN=]PATH: a text file or folder (repeat for domains). Default for a lab "
        "checkpoint: the validation split of the corpus its run trained on (required with --hf)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Trace directory to write (e.g. runs/x/val.trace)."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", min=1, help="Tokens per sequence (documents are cut into pieces); default: the model's "
        "max_seq_len (256 for transformers checkpoints)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Stop after this many tokens."),
    device: str = typer.Option("cpu", "--device", help="torch device to run the model on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace at --out."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted trace at --out."),
    hf: bool = typer.Option(False, "--hf", help="CHECKPOINT is a transformers MoE checkpoint (see `trace-hf`)."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Prepared-corpus cache of the run, when --corpus is not given (default "
        "$ROUTELAB_CACHE or .cache/routelab)."
    ),
) -> None:
    """Run a trained checkpoint over a corpus (default: its run's validation split) and record its routing."""
    check_trace_target(out, resume=resume, overwrite=overwrite)
    check_device(device)
    if hf:
        from routelab.commands.hf import trace_and_summarise

        return trace_and_summarise(str(checkpoint), corpus or [], out, seq_len=seq_len or 256, batch_size=batch_size,
                                   max_tokens=max_tokens, device=device, resume=resume, overwrite=overwrite)
    from routelab.traces import TraceRecorder, TraceWriter
    from routelab.traces.corpus import (
        corpus_description,
        corpus_fingerprint,
        encoder_of,
        parse_corpus,
        record_corpus,
        token_sequences,
    )
    from routelab.traces.recorder import ModuleRoutingSource
    from routelab.traces.resume_check import check_resume_setup, file_sha256

    console = Console(stderr=True)
    entries = parse_corpus(corpus) if corpus else None
    model, tokenizer, ckpt_meta = load_checkpoint(checkpoint)
    model = model.to(device).eval()
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    seq_len = seq_len or limit or 256
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len={limit}; use --seq-len {limit} or less.")
    depth_routed = getattr(model, "depth", None) is not None
    if depth_routed:
        from routelab.depth.trace import DepthRoutingSource

        source = DepthRoutingSource(model)
    else:
        source = ModuleRoutingSource(model)
    config = getattr(model, "config", None)
    weights_file = Path(ckpt_meta.get("path") or checkpoint)
    setup: dict[str, Any] = {"checkpoint_sha256": file_sha256([weights_file]) if weights_file.is_file() else None,
                             "seq_len": seq_len, "batch_size": batch_size, "max_tokens": max_tokens}
    metadata = {
        "model": ckpt_meta.get("name") or Path(checkpoint).stem,
        "router": ckpt_meta.get("router") or getattr(config, "router", None),
        "checkpoint": str(checkpoint),
        "tokenizer_hash": ckpt_meta.get("tokenizer_hash") or _tokenizer_hash(tokenizer),
        "seq_len": seq_len,
        "moe_layers": source.layer_names,
        "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
        **({} if depth_routed else _expert_size(model, source.num_experts)),
    }
    if depth_routed:
        metadata["depth"] = source.describe()
    if entries is not None:
        metadata.update(corpus=corpus_description(entries), domain_names=[e.domain for e in entries])
        setup["corpus"] = corpus_fingerprint(entries)
        sequences = token_sequences(entries, encoder_of(tokenizer), seq_len)
        total = max_tokens
    else:
        metadata["corpus"], metadata["domain_names"], sequences, total = training_validation_split(
            checkpoint, seq_len, cache_dir
        )
        setup["corpus"] = [{"domain": d["domain"], "split": d["split"], "sha256": d["content_hash"]}
                           for d in metadata["corpus"]]
        total = min(total, max_tokens) if max_tokens is not None else total
    metadata["trace_setup"] = setup
    if resume:
        check_resume_setup(out, setup)
        writer = TraceWriter.resume(out)
    else:
        writer = TraceWriter(out, metadata, source.num_layers, source.num_experts, overwrite=overwrite)
    with writer, Progress(TextColumn("tracing"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                          TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("trace", total=total, completed=writer.num_tokens)
        tokens = record_corpus(TraceRecorder(source, writer), sequences, batch_size=batch_size,
                               max_tokens=max_tokens, on_batch=lambda n: bar.advance(task, n), device=device)
    kind = "depth-routed" if depth_routed else "MoE"
    Console().print(f"wrote {tokens} tokens x {source.num_layers} {kind} layers to {out}")


def analyze_command(
    trace_path: Path = typer.Argument(..., help="Trace directory."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default: <trace>-analysis)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Analyse only the first N tokens."),
    windows: str = typer.Option("4,16,64,256", "--windows", help="SRP windows / SCH look-aheads."),
    sequence_stride: int = typer.Option(16, "--sequence-stride", min=1, help="SCH replays every n-th sequence (moe-lrc: 16)."),
    devices: int | None = typer.Option(None, "--devices", min=1, help="EP devices (default: largest divisor of E up to 8)."),
    no_prefetch: bool = typer.Option(False, "--no-prefetch", help="Skip the layer-ahead prefetch simulation."),
) -> None:
    """Write a markdown report with plots: balance, SRP/SCH, caches, domains, EP, scheduling."""
    console = Console()
    from routelab.systems.report import AnalysisOptions, analyze_trace

    options = AnalysisOptions(windows=parse_int_list(windows, "--windows", minimum=1), sequence_stride=sequence_stride,
                              devices=devices, prefetch=not no_prefetch)
    trace = _open_trace(trace_path, max_tokens)
    target = out or trace_path.with_name(trace_path.name + "-analysis")
    from routelab.core.run_lock import FolderLock

    with FolderLock(target, "analysis folder"), console.status("analysing") as status:
        report = analyze_trace(trace, target, options, progress=lambda s: status.update(f"analysing: {s}"))
    console.print(f"report: {report}")


def _expert_size(model: Any, num_experts: int) -> dict[str, Any]:
    """Expert size metadata of the first experts module of a lab model (none for a dense model)."""
    from routelab.moe.experts import BatchedExperts
    from routelab.systems.expert_size import expert_size_metadata

    experts = next((m for m in model.modules() if isinstance(m, BatchedExperts)), None)
    return expert_size_metadata(experts, num_experts) if experts is not None else {}


def simulate_cache_command(
    trace_path: Path = typer.Argument(..., help="Trace directory."),
    sizes: str | None = typer.Option(None, "--sizes", help="Cache sizes in experts per layer (default k,2k,4k,..,E)."),
    policies: str = typer.Option("lru,lfu,belady", "--policies", help="Demand-paging policies."),
    scope: str = typer.Option("layer", "--scope", help="layer (one cache per layer) or pooled (shared)."),
    prefetch: bool = typer.Option(False, "--prefetch", help="Add LRU with layer-ahead prefetch."),
    predictor: str = typer.Option("transition", "--predictor", help="transition (learned) or oracle."),
    prefetch_width: int | None = typer.Option(
        None, "--prefetch-width", min=1, help="Experts prefetched per layer (default k)."
    ),
    expert_mb: float | None = typer.Option(
        None, "--expert-mb", help="Expert size in MB (default: from the trace metadata, else a Mixtral expert, 352 MB)."
    ),
    bandwidth_gbs: float = typer.Option(25.0, "--bandwidth-gbs", help="Host-to-device bandwidth, GB/s."),
    compute_ms: float = typer.Option(0.5, "--compute-ms", help="Compute per token and expert, ms."),
    reset_per_sequence: bool = typer.Option(False, "--reset-per-sequence", help="Empty caches at each sequence."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Use only the first N tokens."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Replay a trace against expert caches: hit rate, bytes moved and latency per policy and size."""
    console = Console()
    from routelab.systems.cache import BandwidthModel, simulate_cache
    from routelab.systems.expert_size import resolve_expert_size

    check_at_least("--expert-mb", expert_mb, 0, strict=True)
    check_at_least("--bandwidth-gbs", bandwidth_gbs, 0, strict=True)
    check_at_least("--compute-ms", compute_ms, 0)
    cache_sizes = parse_int_list(sizes, "--sizes", minimum=1)
    policy_names = [p.strip() for p in policies.split(",") if p.strip()]
    if not policy_names:
        raise ConfigError("--policies is empty; name at least one of lru, lfu, belady.")
    trace = _open_trace(trace_path, max_tokens)
    size = resolve_expert_size(expert_mb, trace.metadata)
    model = BandwidthModel(expert_bytes=size.bytes, bandwidth=bandwidth_gbs * 1e9, expert_compute_s=compute_ms / 1e3)
    sweep = simulate_cache(
        trace, cache_sizes=cache_sizes, policies=policy_names, scope=scope, prefetch=prefetch,
        predictor=predictor, prefetch_width=prefetch_width, reset_per_sequence=reset_per_sequence, model=model,
    )
    console.print(f"expert size: {size.bytes / 1e6:.3g} MB, from {size.source}")
    table = Table(title=f"expert cache ({scope}), {sweep.tokens} tokens x {sweep.num_layers} layers")
    for col in ("policy", "C", "hit rate", "loads", "GB moved", "prefetch loads", "prefetch GB", "ms/token"):
        table.add_column(col, justify="right")
    for r in sweep.results:
        table.add_row(r.policy, str(r.cache_size), f"{r.hit_rate:.4f}", str(r.demand_loads),
                      f"{r.bytes_moved / 1e9:.2f}",
                      str(r.prefetch_loads), f"{r.prefetch_bytes / 1e9:.2f}", f"{r.latency_per_token_s * 1e3:.3f}")
    console.print(table)
    if sweep.predictor_recall is not None:
        console.print(f"predictor recall {sweep.predictor_recall:.3f}, precision {sweep.predictor_precision:.3f}. "
                      + " ".join(sweep.notes))
    if json_out:
        json_out.write_text(json.dumps([r.as_row() for r in sweep.results], indent=1))


def simulate_ep_command(
    trace_path: Path = typer.Argument(..., help="Trace directory."),
    devices: int | None = typer.Option(None, "--devices", min=1, help="EP devices (default: largest divisor of E up to 8)."),
    batch_tokens: int = typer.Option(16384, "--batch-tokens", min=1, help="Tokens per step across all devices."),
    lam: float = typer.Option(1.3, "--lambda", help="LLEP imbalance gate λ."),
    alpha: float = typer.Option(1.0, "--alpha", help="LLEP capacity factor α."),
    min_chunk: int = typer.Option(1024, "--min-chunk", min=1, help="LLEP minimum GEMM size m."),
    gate: str = typer.Option("gpu", "--gate", help="Imbalance ratio of the gate: gpu or expert loads."),
    d_model: int = typer.Option(2880, "--d-model", min=1, help="Expert input width (default: gpt-oss-120b)."),
    d_hidden: int = typer.Option(2880, "--d-hidden", min=1, help="Expert hidden width (default: gpt-oss-120b)."),
    tflops: float = typer.Option(400.0, "--tflops", help="Sustained GEMM TFLOP/s per device."),
    link_gbs: float = typer.Option(200.0, "--link-gbs", help="All-to-all and weight-transfer GB/s per rank."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Use only the first N tokens."),
) -> None:
    """Per-device load, all-to-all bytes and step time of standard EP vs LLEP."""
    console = Console()
    from routelab.systems.ep import EPCostModel, LLEPConfig, simulate_ep

    check_at_least("--tflops", tflops, 0, strict=True)
    check_at_least("--link-gbs", link_gbs, 0, strict=True)
    check_at_least("--lambda", lam, 1)
    check_at_least("--alpha", alpha, 0, strict=True)
    model = EPCostModel(d_model=d_model, d_hidden=d_hidden, flops=tflops * 1e12, link_bandwidth=link_gbs * 1e9,
                        p2p_bandwidth=link_gbs * 1e9)
    llep = LLEPConfig(lam=lam, alpha=alpha, min_chunk=min_chunk, gate=gate)
    trace = _open_trace(trace_path, max_tokens)
    report = simulate_ep(trace, devices=devices, batch_tokens=batch_tokens, llep=llep, model=model)
    table = Table(title=f"expert parallelism: {report.num_devices} devices, "
                        f"{report.steps} layer-steps of {report.batch_tokens} tokens")
    table.add_column("")
    table.add_column("standard EP", justify="right")
    table.add_column("LLEP", justify="right")
    table.add_row("max/mean device load", f"{report.max_mean_load:.3f}", f"{report.max_mean_load_llep:.3f}")
    per_step = 1e3 / report.steps
    table.add_row("step time (ms, mean)", f"{report.time_s * per_step:.3f}", f"{report.time_s_llep * per_step:.3f}")
    table.add_row("all-to-all MB per rank", f"{report.a2a_bytes_per_rank / 1e6:.2f}",
                  f"{report.a2a_bytes_per_rank_llep / 1e6:.2f}")
    table.add_row("weights moved MB per step", "0", f"{report.weight_bytes_per_step_llep / 1e6:.1f}")
    table.add_row("per-device load", " ".join(f"{v:.0f}" for v in report.device_loads),
                  " ".join(f"{v:.0f}" for v in report.device_loads_llep))
    console.print(table)
    console.print(f"LLEP speed-up {report.speedup:.2f}x; LLEP applied in {report.llep_applied_fraction:.0%} of steps.")


def simulate_schedule_command(
    trace_path: Path = typer.Argument(..., help="Trace directory."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Items per batch."),
    unit: str = typer.Option("sequence", "--unit", help="sequence (decode) or token (prefill)."),
    pool_size: int | None = typer.Option(None, "--pool", min=1, help="Items the scheduler may reorder at once."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Use only the first N tokens."),
) -> None:
    """ExpertFlow-style regrouping of queued work into batches that activate fewer experts."""
    console = Console()
    from routelab.systems.scheduling import schedule_trace

    result = schedule_trace(_open_trace(trace_path, max_tokens), batch_size, unit=unit, pool_size=pool_size)
    console.print(
        f"{len(result.batches)} batches of {batch_size} {unit}s: distinct experts per batch and layer "
        f"{result.arrival_experts_per_batch_layer:.2f} in arrival order -> {result.experts_per_batch_layer:.2f} "
        f"scheduled ({result.reduction:.1%} fewer)."
    )


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_command)
    app.command("analyze")(analyze_command)
    simulate = typer.Typer(help="Serving simulations from a routing trace.", no_args_is_help=True)
    simulate.command("cache")(simulate_cache_command)
    simulate.command("ep")(simulate_ep_command)
    simulate.command("schedule")(simulate_schedule_command)
    app.add_typer(simulate, name="simulate")
