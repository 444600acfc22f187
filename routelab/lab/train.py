"""The training loop of one run: AdamW, warmup + cosine, clipping, bf16 autocast, gradient
accumulation, router aux losses, ``routelab.end_of_step`` after every optimizer step (an
optimizer step hook, ``routelab.register_end_of_step``), routers fitted to the training
tokens first (``routelab.fit_to_data``), periodic validation, JSONL metrics and atomic,
exactly resumable checkpoints.

A run lives in one folder::

    config.json          model, training and corpus settings
    metrics.jsonl        one row per logged step ("train") and per evaluation ("eval")
    checkpoint.pt        the latest training state (removed at the end unless keep_checkpoint)
    model.pt             the final model (routelab.lab.checkpoint.load_model reads it)
    probe_routing.npz    routing of the fixed probe batch at every evaluation
    val_routing.npz      routing of the whole validation set at the final evaluation
    summary.json         written last: the run is finished

Exact resume: batches are a function of (seed, step), and the checkpoint holds the model,
optimizer, scheduler and RNG states at a step boundary, so a run killed after its
checkpoint at step k and resumed reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from routelab.core.atomic_files import atomic_path, atomic_write_json, atomic_write_text
from routelab.core.errors import ConfigError, RoutelabError
from routelab.core.json_files import read_json, read_jsonl_rows
from routelab.core.run_lock import holds_folder_lock
from routelab.lab.batches import Batch, TrainSampler, eval_batches, probe_batch
from routelab.lab.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FILE,
    MODEL_FORMAT,
    atomic_save,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from routelab.lab.config import TrainConfig
from routelab.lab.data import PreparedCorpus
from routelab.lab.depth_stage import finish_depth
from routelab.lab.evaluation import RoutingCollector, autocast, evaluate, pad_slots, routing_fluctuation
from routelab.lab.interrupt import deferred_interrupt
from routelab.lab.objective import training_forward
from routelab.models.tinylm import TinyLM, TinyLMConfig
from routelab.routers.parts.router import fit_to_data, register_end_of_step

STEP_STATS = ("max_vio", "cv", "dead_experts", "drop_rate", "active_experts_per_token")


class RunFiles:
    """Paths of a run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoint = self.root / CHECKPOINT_FILE
        self.model = self.root / MODEL_FILE
        self.probe = self.root / "probe_routing.npz"
        self.val_routing = self.root / "val_routing.npz"
        self.summary = self.root / "summary.json"

    def finished(self) -> bool:
        return self.summary.is_file()


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, index: int) -> float:
        if index < self.warmup:
            return (index + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((index - self.warmup) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cpu_has_amx_bf16() -> bool:
    """True when the CPU has AMX bf16 tiles (``amx_bf16`` in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CPU with AMX bf16 tiles, else ``fp32``.

    Decided from the hardware, not by timing, so that the choice does not depend on load.
    AVX512-BF16 without AMX is not enough: on such a Xeon bf16 autocast trained the demo's
    TinyLM 2.0x slower than fp32 and ran the MoE layer benchmark 1.4-1.6x slower, while
    the machine that first recorded that benchmark ran it 2.7-3.5x faster in bf16
    (docs/benchmarks.md; its CPU flags were not recorded, AMX is the likely difference).
    """
    if precision != "auto":
        return precision
    return "bf16" if cpu_has_amx_bf16() else "fp32"


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D router state).

    The fused implementation is used where torch has it (CPU since torch 2.4): about 10x
    faster than the per-tensor loop on the tens of millions of expert parameters that an
    MoE holds, and deterministic.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)
    except (RuntimeError, TypeError):  # a device or build without the fused kernel
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``. A partly written last line (from a kill) is ignored; an
    unreadable line before it means the file was damaged and raises ``InputError``."""
    return read_jsonl_rows(path)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows up to ``last_step`` (a killed run may have logged steps after its checkpoint)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def config_record(model_config: TinyLMConfig, train_config: TrainConfig, corpus: PreparedCorpus) -> dict[str, Any]:
    return {"model_config": model_config.to_dict(), "train_config": train_config.model_dump(), "corpus": corpus.describe()}


def check_same_run(stored: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """Refuse to resume a run folder with different settings."""
    differences = []
    for section in ("model_config", "train_config"):
        for key in sorted(set(stored[section]) | set(current[section])):
            a, b = stored[section].get(key), current[section].get(key)
            if a != b and not (section == "train_config" and key == "precision" and "auto" in (a, b)):
                differences.append(f"{section}.{key}: {a!r} -> {b!r}")
    if stored["corpus"]["content_hash"] != current["corpus"]["content_hash"]:
        differences.append("corpus content hash changed")
    if differences:
        raise ConfigError(
            f"cannot resume {str(folder)!r}: its settings differ from the requested ones ({'; '.join(differences)}). "
            "Resume with the original settings, or train into a new folder."
        )


def step_routing_stats(routings_per_micro: list[list[Any]]) -> dict[str, list[float]]:
    """Per-layer routing statistics of one optimizer step, averaged over its micro-batches."""
    out: dict[str, list[float]] = {}
    if not routings_per_micro or not routings_per_micro[0]:
        return out
    for key in STEP_STATS:
        out[key] = [
            sum(float(micro[layer].stats[key]) for micro in routings_per_micro) / len(routings_per_micro)
            for layer in range(len(routings_per_micro[0]))
        ]
    return out


class ProbeHistory:
    """Routing of the probe batch at every evaluation (kept in checkpoints, saved as npz)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.topk_idx: list[list[torch.Tensor]] = []
        self.topk_weight: list[list[torch.Tensor]] = []

    def add(self, step: int, idx: list[torch.Tensor], weight: list[torch.Tensor]) -> float | None:
        """Record one evaluation; return the fluctuation against the previous one (None for the first)."""
        fluctuation = None
        if self.topk_idx:
            fluctuation, _ = routing_fluctuation(self.topk_idx[-1], idx)
        self.steps.append(step)
        self.topk_idx.append([t.to(torch.int16 if t.numel() and int(t.max()) < 2**15 else torch.int64) for t in idx])
        self.topk_weight.append([t.float() for t in weight])
        return fluctuation

    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "topk_idx": self.topk_idx, "topk_weight": self.topk_weight}

    def load(self, state: dict[str, Any]) -> None:
        self.steps = list(state["steps"])
        self.topk_idx = list(state["topk_idx"])
        self.topk_weight = list(state["topk_weight"])

    def save(self, path: Path, probe: Batch, moe_layers: list[int]) -> None:
        """``probe_routing.npz``: ``topk_idx``/``topk_weight`` ``[evals, layers, tokens, slots]`` (-1/0 padded)."""
        arrays: dict[str, np.ndarray] = {
            "steps": np.asarray(self.steps, dtype=np.int64),
            "token_ids": probe.inputs.numpy(),
            "domains": probe.domains.numpy(),
            "moe_layers": np.asarray(moe_layers, dtype=np.int64),
        }
        if self.topk_idx and self.topk_idx[0]:
            width = max(t.shape[1] for per_eval in self.topk_idx for t in per_eval)
            arrays["topk_idx"] = torch.stack(
                [torch.stack([pad_slots(t.long(), width) for t in per_eval]) for per_eval in self.topk_idx]
            ).numpy()
            weights = []
            for per_eval in self.topk_weight:
                layer_weights = []
                for t in per_eval:
                    padded = torch.zeros(t.shape[0], width)
                    padded[:, : t.shape[1]] = t
                    layer_weights.append(padded)
                weights.append(torch.stack(layer_weights))
            arrays["topk_weight"] = torch.stack(weights).numpy()
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **arrays)


def progress_bars(console: Console, show: bool) -> Progress | NoProgress:
    """The run's progress bars, or a silent stand-in when ``show`` is False."""
    return make_progress(console) if show else NoProgress()


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@dataclass
class TrainingState:
    """What a checkpoint restores: the model, optimizer, LR schedule, probe history and totals."""

    model: TinyLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    history: ProbeHistory
    step: int = 0
    train_tokens: int = 0
    train_time: float = 0.0

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.history.load(state["probe_history"])
        self.step = int(state["step"])
        self.train_tokens = int(state["totals"]["train_tokens"])
        self.train_time = float(state["totals"]["train_time_s"])

    def checkpoint(self, seed: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "data": {"seed": seed, "next_step": self.step + 1},
            "totals": {"train_tokens": self.train_tokens, "train_time_s": self.train_time},
            "probe_history": self.history.state(),
        }


@dataclass
class RunData:
    """The batches of a run: training batches by step, the validation set and the probe batch."""

    sampler: TrainSampler
    val_set: list[Batch]
    probe: Batch
    domains: list[str]

    @classmethod
    def of(cls, corpus: PreparedCorpus, config: TrainConfig) -> RunData:
        sampler = TrainSampler(corpus.tokens("train"), corpus.domain_labels("train"), config.seq_len,
                               config.batch_size, config.seed)
        val_tokens, val_labels = corpus.tokens("val"), corpus.domain_labels("val")
        val_set = eval_batches(val_tokens, val_labels, config.seq_len, config.batch_size, config.eval_tokens)
        probe = probe_batch(val_tokens, val_labels, config.seq_len, config.probe_sequences)
        return cls(sampler, val_set, probe, corpus.domains)


def check_run_inputs(corpus: PreparedCorpus, model_config: TinyLMConfig, train_config: TrainConfig) -> None:
    if model_config.max_seq_len < train_config.seq_len:
        raise ConfigError(f"model max_seq_len={model_config.max_seq_len} < seq_len={train_config.seq_len}.")
    if model_config.vocab_size != corpus.vocab_size:
        raise ConfigError(f"model vocab_size={model_config.vocab_size} but the tokenizer has {corpus.vocab_size} tokens.")


def open_run_folder(files: RunFiles, record: dict[str, Any], train_config: TrainConfig, resume: bool) -> bool:
    """Check ``files`` against the requested run and write its ``config.json``; True when resuming.

    Fixes ``record["train_config"]["precision"]``: the stored one when the folder holds
    this run, else ``precision='auto'`` resolved now. A finished run's folder is left as is.
    """
    has_run = files.finished() or files.checkpoint.is_file()
    if has_run and not resume:
        raise ConfigError(
            f"{str(files.root)!r} already holds a run; pass --resume to continue (or return) it, or choose another folder."
        )
    if files.config.is_file() and has_run:
        stored = read_json(files.config, "run config")
        check_same_run(stored, record, files.root)
        record["train_config"]["precision"] = stored["train_config"]["precision"]
    if files.finished():
        return True
    resuming = files.checkpoint.is_file()
    if not resuming:
        record["train_config"]["precision"] = resolve_precision(train_config.precision)
    files.root.mkdir(parents=True, exist_ok=True)
    write_json(files.config, record)
    return resuming


def start_training(
    files: RunFiles, corpus: PreparedCorpus, model_config: TinyLMConfig, train_config: TrainConfig, resuming: bool
) -> TrainingState:
    """A fresh model, optimizer and schedule for the run's seed, restored from the checkpoint when resuming."""
    seed_everything(train_config.seed)
    model = TinyLM(model_config)
    fit_to_data(model, torch.from_numpy(np.asarray(corpus.tokens("train"), dtype=np.int64)), model_config.vocab_size)
    optimizer = build_optimizer(model, train_config)
    register_end_of_step(optimizer, model)  # routers' once-per-step updates (e.g. loss-free bias)
    schedule = WarmupCosine(train_config.warmup_steps, train_config.steps, train_config.min_lr_ratio)
    state = TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), ProbeHistory())
    if resuming:
        state.restore(read_checkpoint(files.checkpoint))
        truncate_metrics(files.metrics, state.step)
    elif files.metrics.exists():
        files.metrics.unlink()
    return state


def train_step(state: TrainingState, data: RunData, config: TrainConfig, precision: str, label: str) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; returns its ``metrics.jsonl`` train row."""
    state.step += 1
    step = state.step
    start = time.perf_counter()
    routings, losses, lm_losses, aux_losses, flops = [], [], [], [], []
    for micro in range(config.grad_accum):
        batch = data.sampler.batch(step, micro)
        with autocast(precision):
            out = training_forward(state.model, batch, seed=config.seed, step=step, micro=micro)
        if not torch.isfinite(out.loss):
            raise RoutelabError(
                f"the training loss became {float(out.loss)} at step {step} ({label}); lower lr "
                f"(now {config.lr}) or use precision='fp32'. The last checkpoint is kept."
            )
        (out.loss / config.grad_accum).backward()
        routings.append(out.routings)
        losses.append(float(out.loss.detach()))
        lm_losses.append(float(out.lm_loss.detach()))
        aux_losses.append(float(out.aux_loss.detach()))
        flops.append(out.flops_per_token)
    grad_norm = None
    if config.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip))
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    state.train_tokens += config.tokens_per_step
    state.train_time += elapsed
    return {
        "kind": "train", "step": step, "tokens": state.train_tokens, "lr": lr, "loss": sum(losses) / len(losses),
        "lm_loss": sum(lm_losses) / len(lm_losses), "aux_loss": sum(aux_losses) / len(aux_losses),
        "grad_norm": grad_norm, "step_time_s": elapsed, "tokens_per_s": config.tokens_per_step / elapsed,
        "flops_per_token": sum(flops) / len(flops), **step_routing_stats(routings),
    }


def evaluation_row(state: TrainingState, data: RunData, files: RunFiles, precision: str, final: bool,
                   depth_fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate on the validation set and the probe batch; the final evaluation also saves ``val_routing.npz``
    (MoE routing) or, for a depth-routed model, first runs its second stage and mode report
    (``routelab.lab.depth_stage``)."""
    depth_routed = state.model.depth is not None
    collector = RoutingCollector() if final and not depth_routed else None
    depth_record = finish_depth(state.model, data.sampler, data.val_set, state.step, depth_fit) if final and depth_routed else {}
    metrics, probe_idx, probe_weight = evaluate(state.model, data.val_set, data.probe, data.domains, precision, collector)
    metrics.update(depth_record)
    if collector is not None:
        collector.save(files.val_routing, state.model.moe_layers)
    fluctuation = state.history.add(state.step, probe_idx, probe_weight)
    return {"kind": "eval", "step": state.step, "tokens": state.train_tokens, "routing_fluctuation": fluctuation,
            **metrics}


def finish_run(
    state: TrainingState, data: RunData, files: RunFiles, run_payload: dict[str, Any], *, label: str, router: str,
    train_config: TrainConfig, precision: str, wall_time_s: float,
) -> dict[str, Any]:
    """Write ``model.pt``, ``probe_routing.npz`` and, last, ``summary.json``; returns the summary."""
    params = state.model.parameter_counts()
    summary = {
        "label": label,
        "router": router,
        "depth_router": state.model.config.depth_router,
        "seed": train_config.seed,
        "steps": state.step,
        "train_tokens": state.train_tokens,
        "train_time_s": state.train_time,
        "train_tokens_per_s": state.train_tokens / state.train_time if state.train_time > 0 else None,
        "wall_time_s_last_session": wall_time_s,
        "precision": precision,
        "params_total": params["total"],
        "params_active": params["active"],
        "moe_layers": state.model.moe_layers,
        "final_eval": [r for r in read_metrics(files.metrics) if r["kind"] == "eval"][-1],
    }
    atomic_save({**run_payload, "format": MODEL_FORMAT, "step": state.step, "model": state.model.state_dict()},
                files.model)
    state.history.save(files.probe, data.probe, state.model.moe_layers)
    write_json(files.summary, summary)
    if not train_config.keep_checkpoint:
        files.checkpoint.unlink(missing_ok=True)
    return summary


@holds_folder_lock(lambda run_dir, *args, **kwargs: run_dir, "run folder")
def train_run(
    run_dir: str | Path,
    corpus: PreparedCorpus,
    model_config: TinyLMConfig,
    train_config: TrainConfig,
    *,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    label: str | None = None,
    on_step_end: Callable[[int], None] | None = None,
    depth_fit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one TinyLM into ``run_dir`` and return its summary.

    Args:
        resume: continue from ``run_dir/checkpoint.pt`` (a finished run is returned as is).
            Without it, a folder that already holds a run is refused.
        on_step_end: called with the step number after each step (and its checkpoint).
        depth_fit: options of a depth router's second stage (``routelab.lab.depth_stage``).
    """
    files = RunFiles(run_dir)
    console = console or Console(stderr=True)
    router = model_config.router if model_config.ffn == "moe" else "dense"
    label = label or router
    check_run_inputs(corpus, model_config, train_config)
    record = config_record(model_config, train_config, corpus)
    resuming = open_run_folder(files, record, train_config, resume)
    if files.finished():
        return read_json(files.summary, "run summary")
    precision = record["train_config"]["precision"]
    state = start_training(files, corpus, model_config, train_config, resuming)
    data = RunData.of(corpus, train_config)
    run_payload = {
        "version": FORMAT_VERSION,
        "model_config": record["model_config"],
        "train_config": record["train_config"],
        "corpus": record["corpus"],
        "tokenizer": corpus.tokenizer.to_json(),
    }
    wall_start = time.perf_counter()
    state.model.train()
    with files.metrics.open("a") as log, deferred_interrupt() as stop, (
        progress_bars(console, show_progress)
    ) as progress:
        task = progress.add_task(label, total=train_config.steps, completed=state.step, loss="-", speed="-")
        while state.step < train_config.steps:
            row = train_step(state, data, train_config, precision, label)
            step, last = state.step, state.step == train_config.steps
            if step % train_config.log_every == 0 or last:
                log.write(json.dumps(row) + "\n")
            if step % train_config.eval_every == 0 or last:
                log.write(json.dumps(evaluation_row(state, data, files, precision, final=last, depth_fit=depth_fit)) + "\n")
            log.flush()
            progress.update(task, completed=step, loss=f"{row['loss']:.3f}",
                            speed=f"{state.train_tokens / state.train_time:,.0f}")
            if step % train_config.checkpoint_every == 0 or stop.requested or last:
                atomic_save({**run_payload, **state.checkpoint(train_config.seed)}, files.checkpoint)
            if stop.requested:
                console.print(f"[yellow]interrupted: checkpoint saved at step {step} in {files.root}; "
                              "resume with --resume.[/]")
                raise KeyboardInterrupt
            if on_step_end is not None:
                on_step_end(step)
    return finish_run(state, data, files, run_payload, label=label, router=router, train_config=train_config,
                      precision=precision, wall_time_s=time.perf_counter() - wall_start)


class NoProgress:
    """Stands in for a rich ``Progress`` when progress bars are off."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None
