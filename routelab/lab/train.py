"""The training loop of one run: AdamW, warmup + cosine, clipping, bf16 autocast, gradient
accumulation, router aux losses, ``routelab.end_of_step`` after every optimizer step,
periodic validation, JSONL metrics and atomic, exactly resumable checkpoints.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from routelab.core.errors import ConfigError, RoutelabError
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
from routelab.lab.evaluation import RoutingCollector, autocast, evaluate, pad_slots, routing_fluctuation
from routelab.lab.interrupt import deferred_interrupt
from routelab.lab.objective import training_forward
from routelab.models.tinylm import TinyLM, TinyLMConfig
from routelab.routers.parts.router import end_of_step
from routelab.routers.families.fixed import HashSelector

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


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU or a CPU with native bf16 matmuls, else ``fp32``.

    Decided from the hardware, not by timing, so that the choice does not depend on load.
    Without native support bf16 autocast on a CPU is emulated and slower than fp32.
    """
    if precision != "auto":
        return precision
    return "bf16" if cpu_has_native_bf16() else "fp32"


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


def fit_hash_tables(model: TinyLM, tokens: np.ndarray) -> None:
    """Fit every frequency-balanced hash router to the training token counts (Roller et al. 2021)."""
    counts = None
    for module in model.modules():
        if isinstance(module, HashSelector) and module.mode == "balanced":
            if counts is None:
                counts = torch.from_numpy(np.bincount(np.asarray(tokens), minlength=model.config.vocab_size))
            module.fit(counts)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a partly written last line from a kill is ignored)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows up to ``last_step`` (a killed run may have logged steps after its checkpoint)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


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
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)


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
) -> dict[str, Any]:
    """Train one TinyLM into ``run_dir`` and return its summary.

    Args:
        resume: continue from ``run_dir/checkpoint.pt`` (a finished run is returned as is).
            Without it, a folder that already holds a run is refused.
        on_step_end: called with the step number after each step (and its checkpoint).
    """
    files = RunFiles(run_dir)
    console = console or Console(stderr=True)
    label = label or (model_config.router if model_config.ffn == "moe" else "dense")
    if model_config.max_seq_len < train_config.seq_len:
        raise ConfigError(f"model max_seq_len={model_config.max_seq_len} < seq_len={train_config.seq_len}.")
    if model_config.vocab_size != corpus.vocab_size:
        raise ConfigError(f"model vocab_size={model_config.vocab_size} but the tokenizer has {corpus.vocab_size} tokens.")
    record = config_record(model_config, train_config, corpus)
    has_run = files.finished() or files.checkpoint.is_file()
    if has_run and not resume:
        raise ConfigError(
            f"{str(files.root)!r} already holds a run; pass --resume to continue (or return) it, or choose another folder."
        )
    if files.config.is_file() and has_run:
        stored = json.loads(files.config.read_text())
        check_same_run(stored, record, files.root)
        record["train_config"]["precision"] = stored["train_config"]["precision"]
    if files.finished():
        return json.loads(files.summary.read_text())

    resuming = files.checkpoint.is_file()
    if not resuming:
        record["train_config"]["precision"] = resolve_precision(train_config.precision)
    precision = record["train_config"]["precision"]
    files.root.mkdir(parents=True, exist_ok=True)
    write_json(files.config, record)

    seed_everything(train_config.seed)
    model = TinyLM(model_config)
    fit_hash_tables(model, corpus.tokens("train"))
    optimizer = build_optimizer(model, train_config)
    schedule = WarmupCosine(train_config.warmup_steps, train_config.steps, train_config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history = ProbeHistory()
    step, train_tokens, train_time = 0, 0, 0.0
    if resuming:
        state = read_checkpoint(files.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        history.load(state["probe_history"])
        step = int(state["step"])
        train_tokens, train_time = int(state["totals"]["train_tokens"]), float(state["totals"]["train_time_s"])
        truncate_metrics(files.metrics, step)
    elif files.metrics.exists():
        files.metrics.unlink()

    domains = corpus.domains
    sampler = TrainSampler(corpus.tokens("train"), corpus.domain_labels("train"), train_config.seq_len,
                           train_config.batch_size, train_config.seed)
    val_tokens, val_labels = corpus.tokens("val"), corpus.domain_labels("val")
    val_set = eval_batches(val_tokens, val_labels, train_config.seq_len, train_config.batch_size, train_config.eval_tokens)
    probe = probe_batch(val_tokens, val_labels, train_config.seq_len, train_config.probe_sequences)
    payload_common = {
        "version": FORMAT_VERSION,
        "model_config": record["model_config"],
        "train_config": record["train_config"],
        "corpus": record["corpus"],
        "tokenizer": corpus.tokenizer.to_json(),
    }

    def save_checkpoint() -> None:
        atomic_save(
            {
                **payload_common,
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "data": {"seed": train_config.seed, "next_step": step + 1},
                "totals": {"train_tokens": train_tokens, "train_time_s": train_time},
                "probe_history": history.state(),
            },
            files.checkpoint,
        )

    wall_start = time.perf_counter()
    model.train()
    with files.metrics.open("a") as log, deferred_interrupt() as stop, (
        make_progress(console) if show_progress else _NoProgress()
    ) as progress:
        task = progress.add_task(label, total=train_config.steps, completed=step, loss="-", speed="-")
        while step < train_config.steps:
            step += 1
            start = time.perf_counter()
            routings, losses, lm_losses, aux_losses = [], [], [], []
            for micro in range(train_config.grad_accum):
                batch = sampler.batch(step, micro)
                with autocast(precision):
                    out = training_forward(model, batch, seed=train_config.seed, step=step, micro=micro)
                if not torch.isfinite(out.loss):
                    raise RoutelabError(
                        f"the training loss became {float(out.loss)} at step {step} ({label}); lower lr "
                        f"(now {train_config.lr}) or use precision='fp32'. The last checkpoint is kept."
                    )
                (out.loss / train_config.grad_accum).backward()
                routings.append(out.routings)
                losses.append(float(out.loss.detach()))
                lm_losses.append(float(out.lm_loss.detach()))
                aux_losses.append(float(out.aux_loss.detach()))
            grad_norm = None
            if train_config.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            end_of_step(model)
            elapsed = time.perf_counter() - start
            step_tokens = train_config.tokens_per_step
            train_tokens += step_tokens
            train_time += elapsed
            loss = sum(losses) / len(losses)
            if step % train_config.log_every == 0 or step == train_config.steps:
                row = {
                    "kind": "train", "step": step, "tokens": train_tokens, "lr": lr, "loss": loss,
                    "lm_loss": sum(lm_losses) / len(lm_losses), "aux_loss": sum(aux_losses) / len(aux_losses),
                    "grad_norm": grad_norm, "step_time_s": elapsed, "tokens_per_s": step_tokens / elapsed,
                    **step_routing_stats(routings),
                }
                log.write(json.dumps(row) + "\n")
            if step % train_config.eval_every == 0 or step == train_config.steps:
                collector = RoutingCollector() if step == train_config.steps else None
                metrics, probe_idx, probe_weight = evaluate(model, val_set, probe, domains, precision, collector)
                if collector is not None:
                    collector.save(files.val_routing, model.moe_layers)
                fluctuation = history.add(step, probe_idx, probe_weight)
                log.write(json.dumps({"kind": "eval", "step": step, "tokens": train_tokens,
                                      "routing_fluctuation": fluctuation, **metrics}) + "\n")
            log.flush()
            progress.update(task, completed=step, loss=f"{loss:.3f}", speed=f"{train_tokens / train_time:,.0f}")
            if step % train_config.checkpoint_every == 0 or stop.requested or step == train_config.steps:
                save_checkpoint()
            if stop.requested:
                console.print(f"[yellow]interrupted: checkpoint saved at step {step} in {files.root}; "
                              "resume with --resume.[/]")
                raise KeyboardInterrupt
            if on_step_end is not None:
                on_step_end(step)

    params = model.parameter_counts()
    final_eval = [r for r in read_metrics(files.metrics) if r["kind"] == "eval"][-1]
    summary = {
        "label": label,
        "router": model_config.router if model_config.ffn == "moe" else "dense",
        "seed": train_config.seed,
        "steps": step,
        "train_tokens": train_tokens,
        "train_time_s": train_time,
        "train_tokens_per_s": train_tokens / train_time if train_time > 0 else None,
        "wall_time_s_last_session": time.perf_counter() - wall_start,
        "precision": precision,
        "params_total": params["total"],
        "params_active": params["active"],
        "moe_layers": model.moe_layers,
        "final_eval": final_eval,
    }
    atomic_save({**payload_common, "format": MODEL_FORMAT, "step": step, "model": model.state_dict()}, files.model)
    history.save(files.probe, probe, model.moe_layers)
    write_json(files.summary, summary)
    if not train_config.keep_checkpoint:
        files.checkpoint.unlink(missing_ok=True)
    return summary


class _NoProgress:
    """Stands in for a rich ``Progress`` when progress bars are off."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None
