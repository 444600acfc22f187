"""``routelab train``, ``routelab compare`` and ``routelab demo``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console

from routelab.commands.common import parse_int_list
from routelab.core.errors import ConfigError

err_console = Console(stderr=True)


def output_console() -> Console:
    """Stdout console; wide enough for the leaderboard when the output is a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values are read as YAML scalars (numbers, true/false, null)."""
    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--option {item!r} must look like KEY=VALUE, e.g. --option aux_loss_coef=0.01.")
        key, value = item.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return options


def parse_top_k(value: str | None) -> int | list[int] | None:
    """``--top-k``: one integer, or one per MoE layer (comma-separated)."""
    values = parse_int_list(value, "--top-k", minimum=1)
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def apply_threads(value: str | None) -> None:
    """``--threads N`` sets torch's intra-op threads; ``auto`` uses the cores that are idle now."""
    if value is None:
        return
    import torch

    if value == "auto":
        threads = auto_threads()
    else:
        try:
            threads = int(value)
        except ValueError:
            raise ConfigError(f"--threads {value!r} must be a positive integer or 'auto'.") from None
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}.")
    torch.set_num_threads(threads)


def idle_cores(window_s: float = 0.5) -> float | None:
    """Idle CPU cores over a short window, from ``/proc/stat`` (None where it does not exist)."""
    import time

    def totals() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)

    try:
        idle_a, total_a = totals()
        time.sleep(window_s)
        idle_b, total_b = totals()
    except (OSError, ValueError, IndexError):
        return None
    import os

    cores = os.cpu_count() or 1
    return cores * (idle_b - idle_a) / max(total_b - total_a, 1)


def auto_threads() -> int:
    """As many threads as cores are idle right now (at least 1, at most the cores we may use).

    On a shared machine a second intra-op thread that keeps getting descheduled makes every
    parallel region wait for it, which is slower than one thread.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))


def given(**values: Any) -> dict[str, Any]:
    """Only the options the user set (typer gives None for the others)."""
    return {k: v for k, v in values.items() if v is not None}


# Shared option declarations (typer reads the defaults' metadata).
STEPS = typer.Option(None, "--steps", help="Optimizer steps.")
BATCH = typer.Option(None, "--batch-size", help="Sequences per micro-batch.")
SEQ_LEN = typer.Option(None, "--seq-len", help="Tokens per sequence.")
ACCUM = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step.")
LR = typer.Option(None, "--lr", help="Peak learning rate.")
WARMUP = typer.Option(None, "--warmup-steps", help="Linear warmup steps.")
PRECISION = typer.Option(None, "--precision", help="fp32, bf16 or auto (bf16 where the CPU has AMX bf16 tiles, else fp32).")
EVAL_EVERY = typer.Option(None, "--eval-every", help="Steps between evaluations.")
EVAL_TOKENS = typer.Option(None, "--eval-tokens", help="Validation tokens per evaluation.")
CKPT_EVERY = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints.")
CORPUS = typer.Option(None, "--corpus", help="'default' (drama + Python code) or a folder of text files / one file.")
MAX_BYTES = typer.Option(None, "--max-bytes-per-domain", help="Cap on the bytes read per domain.")
VOCAB = typer.Option(None, "--vocab-size", help="BPE vocabulary size.")
CHUNK = typer.Option(None, "--chunk-bytes", help="Files larger than this are cut into documents of this size.")
CACHE = typer.Option(None, "--cache-dir", help="Prepared-corpus cache (default $ROUTELAB_CACHE or .cache/routelab).")
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars.")
THREADS = typer.Option(None, "--threads", help="Intra-op threads: a number, or 'auto' (the cores idle right now).")
DEPTH_ROUTER = typer.Option(None, "--depth-router", help="Depth routing: mod, gamma-mod, duo, drllm, lff, halting.")
DEPTH_CAPACITY = typer.Option(None, "--depth-capacity", help="Share of tokens a routed block processes (mod).")
DEPTH_OPTION = typer.Option(None, "--depth-option", help="Depth router option KEY=VALUE (repeatable).")


def depth_overrides(depth_router: str | None, depth_capacity: float | None, depth_option: list[str] | None) -> dict[str, Any]:
    """The experiment's ``depth`` section (``DepthSettings``) from the depth flags."""
    options = parse_options(depth_option)
    if depth_capacity is not None:
        options["capacity"] = depth_capacity
    if options and depth_router is None:
        raise ConfigError("--depth-capacity/--depth-option need --depth-router (e.g. --depth-router mod).")
    return given(router=depth_router, options=options or None)


def model_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The TinyLM shape flags the user set, as ``ModelSettings`` values (``--top-k`` may list one per layer)."""
    if values.get("top_k") is not None:
        values = {**values, "top_k": parse_top_k(values["top_k"])}
    return given(**values)


def shape_flag(field: dataclasses.Field) -> inspect.Parameter:
    """The ``--flag`` of one ``TinyLMConfig`` shape field (None = the field's default)."""
    # integers, except a choice and top_k (one int, or a comma-separated list per MoE layer)
    annotation = str if field.metadata["choices"] or field.name == "top_k" else int
    return inspect.Parameter(
        field.name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Option(None, field.metadata["flag"], help=field.metadata["help"]),
        annotation=Optional[annotation],
    )


def with_shape_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one flag per TinyLM shape field (``routelab.models.tinylm.shape_fields``),
    in place of its ``model`` parameter, which receives the flags the user set as a dict."""
    from routelab.models.tinylm import shape_fields

    flags = [shape_flag(field) for field in shape_fields()]
    names = [flag.name for flag in flags]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        kwargs["model"] = model_overrides({name: kwargs.pop(name) for name in names})
        command(**kwargs)

    parameters = list(inspect.signature(command).parameters.values())
    at = [p.name for p in parameters].index("model")
    parameters = parameters[:at] + flags + parameters[at + 1:]
    hints = typing.get_type_hints(command)
    wrapper.__signature__ = inspect.Signature([p.replace(annotation=hints.get(p.name, p.annotation)) for p in parameters])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    return wrapper


def corpus_overrides(corpus, max_bytes_per_domain, vocab_size, chunk_bytes) -> dict[str, Any]:
    return given(
        source=corpus, max_bytes_per_domain=max_bytes_per_domain, vocab_size=vocab_size, chunk_bytes=chunk_bytes
    )


@with_shape_flags
def train_command(
    router: str = typer.Option("mixtral", "--router", help="Router preset (routelab list), or 'dense'."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Router option KEY=VALUE (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/train/<router>-seed<seed>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and data order."),
    corpus: Optional[str] = CORPUS,
    max_bytes_per_domain: Optional[int] = MAX_BYTES,
    vocab_size: Optional[int] = VOCAB,
    chunk_bytes: Optional[int] = CHUNK,
    model: Optional[dict[str, Any]] = None,  # the TinyLM shape flags the user set (with_shape_flags fills it)
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH,
    seq_len: Optional[int] = SEQ_LEN,
    grad_accum: Optional[int] = ACCUM,
    lr: Optional[float] = LR,
    warmup_steps: Optional[int] = WARMUP,
    precision: Optional[str] = PRECISION,
    eval_every: Optional[int] = EVAL_EVERY,
    eval_tokens: Optional[int] = EVAL_TOKENS,
    checkpoint_every: Optional[int] = CKPT_EVERY,
    cache_dir: Optional[Path] = CACHE,
    no_progress: bool = NO_PROGRESS,
    threads: Optional[str] = THREADS,
    depth_router: Optional[str] = DEPTH_ROUTER,
    depth_capacity: Optional[float] = DEPTH_CAPACITY,
    depth_option: Optional[list[str]] = DEPTH_OPTION,
    expert_parallel: Optional[int] = typer.Option(
        None, "--expert-parallel", help="Shard each MoE layer's experts over N processes (start under torchrun or "
        "`routelab launch`; see docs/parallel.md)."),
    llep: Optional[float] = typer.Option(
        None, "--llep", help="With --expert-parallel: Least-Loaded EP when the busiest rank exceeds the mean by this "
        "ratio (e.g. 1.3)."),
) -> None:
    """Train one TinyLM with one router on a corpus (resumable with --resume)."""
    from routelab.lab.config import CorpusSettings, DepthSettings, ModelSettings, RouterEntry, TrainConfig, validated
    from routelab.lab.data import prepare_corpus
    from routelab.lab.config import ExperimentConfig
    from routelab.lab.experiment import check_routers
    from routelab.lab.train import train_run

    model_settings = validated(ModelSettings, model, "model options")
    depth = validated(DepthSettings, depth_overrides(depth_router, depth_capacity, depth_option), "depth options")
    train = validated(TrainConfig, given(
        steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
        precision=precision, eval_every=eval_every, eval_tokens=eval_tokens, checkpoint_every=checkpoint_every, seed=seed,
    ), "training options")
    corpus_settings = validated(CorpusSettings, corpus_overrides(corpus, max_bytes_per_domain, vocab_size, chunk_bytes),
                                "corpus options")
    entry = RouterEntry(name=router, options=parse_options(option))
    if expert_parallel is not None or llep is not None:
        from routelab.parallel.groups import check_distributed_launch

        check_distributed_launch(expert_parallel, llep)
    apply_threads(threads)
    check_routers(ExperimentConfig(routers=[entry], model=model_settings, depth=depth))
    with err_console.status("preparing the corpus and tokenizer ..."):
        prepared = prepare_corpus(corpus_settings.options(), cache_dir=cache_dir)
    label = router if depth_router is None else f"{router}+{depth_router}"
    folder = out or Path("runs") / "train" / f"{label}-seed{seed}"
    model_config = depth.apply(model_settings.tinylm(vocab_size=prepared.vocab_size, max_seq_len=train.seq_len,
                                                     router=router, router_options=entry.options))
    if expert_parallel is not None or llep is not None:
        from routelab.lab.parallel_train import expert_parallel_command_run

        summary = expert_parallel_command_run(folder, prepared, model_config, train, expert_parallel, llep, resume=resume,
                                              console=err_console, show_progress=not no_progress, label=label)
        if summary is None:  # ranks other than 0 print nothing
            return
    else:
        summary = train_run(folder, prepared, model_config, train, resume=resume, console=err_console,
                            show_progress=not no_progress, label=label, depth_fit=depth.fit)
    final = summary["final_eval"]
    domains = ", ".join(f"{d} {v:.3f}" for d, v in final["val_loss_by_domain"].items())
    output_console().print(
        f"[bold]{label}[/]: val loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.1f}; {domains}), "
        f"{final.get('flops_per_token', 0) / 1e6:.2f} MFLOPs/token, "
        f"{summary['train_tokens_per_s']:,.0f} tok/s. Model: {folder / 'model.pt'}"
    )
    for mode, row in final.get("depth_modes", {}).items():
        output_console().print(f"  {depth_router} mode {mode}: val loss {row['val_loss']:.4f} (first validation "
                               f"batches), {row['flops_per_token'] / 1e6:.2f} MFLOPs/token"
                               f"{'' if row.get('causal') else ' (not causal)'}")


@with_shape_flags
def compare_command(
    config_file: Optional[Path] = typer.Argument(None, help="Experiment file (.yaml/.yml/.toml); flags override it."),
    name: Optional[str] = typer.Option(None, "--name", help="Experiment name (results in <out-dir>/<name>/)."),
    routers: Optional[str] = typer.Option(None, "--routers", help="Comma-separated presets (and/or 'dense')."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Reference router of the TOST (default: first)."),
    margin: Optional[float] = typer.Option(None, "--margin", help="TOST equivalence margin (units of the metric)."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Parent folder of experiments (default runs)."),
    corpus: Optional[str] = CORPUS,
    max_bytes_per_domain: Optional[int] = MAX_BYTES,
    vocab_size: Optional[int] = VOCAB,
    chunk_bytes: Optional[int] = CHUNK,
    model: Optional[dict[str, Any]] = None,  # the TinyLM shape flags the user set (with_shape_flags fills it)
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH,
    seq_len: Optional[int] = SEQ_LEN,
    lr: Optional[float] = LR,
    precision: Optional[str] = PRECISION,
    eval_every: Optional[int] = EVAL_EVERY,
    cache_dir: Optional[Path] = CACHE,
    no_progress: bool = NO_PROGRESS,
    threads: Optional[str] = THREADS,
    depth_router: Optional[str] = DEPTH_ROUTER,
    depth_capacity: Optional[float] = DEPTH_CAPACITY,
    depth_option: Optional[list[str]] = DEPTH_OPTION,
) -> None:
    """Train every router x seed on the same data and budget; write results, plots and report.md."""
    from routelab.lab.experiment import load_experiment

    if config_file is None and routers is None:
        raise ConfigError("give an experiment file (routelab compare exp.yaml) or --routers a,b,c (see docs/lab.md).")
    overrides: dict[str, Any] = given(
        name=name, baseline=baseline, out_dir=out_dir, seeds=parse_int_list(seeds, "--seeds", minimum=0),
        routers=[r.strip() for r in routers.split(",") if r.strip()] if routers else None,
    )
    sections = {
        "model": model,
        "depth": depth_overrides(depth_router, depth_capacity, depth_option),
        "train": given(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, precision=precision,
                       eval_every=eval_every),
        "corpus": corpus_overrides(corpus, max_bytes_per_domain, vocab_size, chunk_bytes),
        "tost": given(margin=margin),
    }
    overrides.update({k: v for k, v in sections.items() if v})
    config = load_experiment(config_file, overrides)
    apply_threads(threads)
    run_and_print(config, cache_dir=cache_dir, show_progress=not no_progress, title=f"routelab compare: {config.name}")


def run_and_print(config: Any, *, cache_dir: Path | None, show_progress: bool, title: str) -> dict[str, Any]:
    from routelab.lab.experiment import run_experiment
    from routelab.lab.report import leaderboard_table, serving_table

    result = run_experiment(config, console=err_console, show_progress=show_progress, cache_dir=cache_dir)
    console = output_console()
    console.print(leaderboard_table(result["aggregates"], result["tost"], title, result.get("noise")))
    serving = serving_table(result["aggregates"], "serving cost of the final routing (validation set)")
    if serving is not None:
        console.print(serving)
    return result


def demo_command(
    out_dir: str = typer.Option("runs", "--out-dir", help="Parent folder; the demo writes <out-dir>/demo/."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the training steps per router."),
    routers: Optional[str] = typer.Option(None, "--routers", help="Override the routers (comma-separated)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Override the seeds (comma-separated)."),
    cache_dir: Optional[Path] = CACHE,
    no_progress: bool = NO_PROGRESS,
    threads: str = typer.Option("auto", "--threads", help="Intra-op threads: a number, or 'auto' (the cores idle right now)."),
) -> None:
    """Compare mixtral, loss-free, expert-choice, hash (and ssr when present) on the default corpus."""
    from routelab.lab.demo import demo_settings
    from routelab.lab.experiment import load_experiment

    start = time.perf_counter()
    settings = demo_settings(out_dir)
    if steps is not None:
        settings["train"]["steps"] = steps
        settings["train"]["eval_every"] = max(1, min(settings["train"]["eval_every"], steps))
        settings["seed_noise_std"] = None  # measured at the demo's own length only
    if routers is not None:
        settings["routers"] = [r.strip() for r in routers.split(",") if r.strip()]
        settings["baseline"] = settings["routers"][0]
    if seeds is not None:
        settings["seeds"] = parse_int_list(seeds, "--seeds", minimum=0)
    config = load_experiment(settings)
    apply_threads(threads)
    import torch

    err_console.print(
        f"routelab demo: routers {[r.key for r in config.routers]}, seeds {config.seeds}, "
        f"{config.train.steps} steps x {config.train.tokens_per_step:,} tokens each, {torch.get_num_threads()} thread(s)"
    )
    result = run_and_print(config, cache_dir=cache_dir, show_progress=not no_progress, title="routelab demo leaderboard")
    elapsed = time.perf_counter() - start
    output_console().print(f"wall time: {elapsed / 60:.1f} min ({elapsed:.0f} s). Report: {result['report']} "
                  f"(plots and tables in {result['report'].parent}/)")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("compare")(compare_command)
    app.command("demo")(demo_command)
