"""``routelab train --expert-parallel N``: one TinyLM run trained with EP x DP on ``W`` processes.

Started by ``torchrun --nproc-per-node W -m routelab train --expert-parallel N ...`` (or
``routelab launch --nproc W train ...``). Every rank builds the same model from the seed,
shards its MoE layers' experts over its EP group (``routelab.parallel``) and takes its
``1/W`` share of every batch of the single-process run (same batches, a function of seed
and step), so the run follows the single-process run up to float rounding.

The run folder holds what a single-process run writes (``config.json`` with a
``parallel`` entry, ``metrics.jsonl``, the final ``model.pt`` in the lab's format, so
``load_model``, ``routelab trace`` and ``analyze`` read it, ``val_routing.npz`` and
``summary.json``) except the probe-routing history: evaluation runs once, at the end, in
rank 0 on the gathered model. The resumable training state is a DCP checkpoint folder
``checkpoint.dcp/`` (sharded experts, AdamW moments, schedule, per-rank random states):
resume with the same command and ``--resume``; a different ``--expert-parallel`` works
too (DCP reshards), a different number of processes does not (the random states).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console

from routelab.core.errors import ConfigError, RoutelabError
from routelab.lab.batches import TrainSampler, eval_batches, probe_batch
from routelab.lab.checkpoint import FORMAT_VERSION, MODEL_FORMAT, atomic_save
from routelab.lab.config import TrainConfig
from routelab.lab.data import PreparedCorpus
from routelab.lab.evaluation import RoutingCollector, autocast, evaluate
from routelab.lab.train import (
    RunFiles,
    WarmupCosine,
    build_optimizer,
    check_same_run,
    config_record,
    make_progress,
    read_metrics,
    resolve_precision,
    seed_everything,
    truncate_metrics,
    write_json,
)
from routelab.models.tinylm import TinyLM, TinyLMConfig
from routelab.parallel.checkpoint import load_checkpoint, save_checkpoint
from routelab.routers import fit_to_data
from routelab.parallel.groups import build_groups, init_process_group_from_env
from routelab.parallel.model import expert_parameter_names, parallelize_moe_layers
from routelab.parallel.trainer import ExpertParallelStep, check_same_config, rank_rows
from routelab.parallel.watchdog import collective_guard
from routelab.routers.parts.router import fit_to_data
from routelab.systems.ep import LLEPConfig

DCP_CHECKPOINT = "checkpoint.dcp"


def gather_full_state(model: torch.nn.Module, groups: Any) -> dict[str, torch.Tensor]:
    """The single-process state dict (expert shards gathered over the EP group)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in expert_parameter_names(model):
        parts = [torch.empty_like(state[name]) for _ in range(groups.ep_size)]
        dist.all_gather(parts, state[name].contiguous(), group=groups.ep_group)
        state[name] = torch.cat(parts)
    return state


def train_expert_parallel(
    run_dir: str | Path,
    corpus: PreparedCorpus,
    model_config: TinyLMConfig,
    train_config: TrainConfig,
    *,
    expert_parallel: int,
    llep: LLEPConfig | None = None,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    label: str | None = None,
    timeout_s: float = 300.0,
    on_step_end: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """Train one TinyLM with EP x DP (call on every rank); rank 0 returns the summary, the others None.

    ``on_step_end`` is called with the step number after each step (and its checkpoint).
    """
    if model_config.ffn != "moe":
        raise ConfigError("--expert-parallel needs MoE layers; the dense model has no experts to distribute.")
    init_process_group_from_env(timeout_s=timeout_s)
    groups = build_groups(expert_parallel, timeout_s=timeout_s)
    files = RunFiles(run_dir)
    console = console or Console(stderr=True)
    label = label or model_config.router
    record = config_record(model_config, train_config, corpus)
    record["parallel"] = {"processes": groups.world_size, "expert_parallel": expert_parallel,
                          "llep": None if llep is None else llep.__dict__}
    check_same_config({**record, "resume": resume}, groups)
    rank_rows(train_config.batch_size, groups)
    checkpoint = files.root / DCP_CHECKPOINT
    has_run = files.finished() or checkpoint.is_dir()
    if has_run and not resume:
        raise ConfigError(f"{str(files.root)!r} already holds a run; pass --resume to continue it, or choose another folder.")
    if files.config.is_file() and has_run:
        stored = json.loads(files.config.read_text())
        check_same_run(stored, record, files.root)
        record["train_config"]["precision"] = stored["train_config"]["precision"]
    if files.finished():
        return json.loads(files.summary.read_text()) if groups.rank == 0 else None
    resuming = checkpoint.is_dir()
    if not resuming:
        record["train_config"]["precision"] = resolve_precision(train_config.precision)
    precision = record["train_config"]["precision"]
    if groups.rank == 0:
        files.root.mkdir(parents=True, exist_ok=True)
        write_json(files.config, record)

    seed_everything(train_config.seed)
    model = TinyLM(model_config)
    fit_to_data(model, torch.from_numpy(np.asarray(corpus.tokens("train"), dtype=np.int64)), model_config.vocab_size)
    parallelize_moe_layers(model, groups, llep=llep)
    optimizer = build_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(train_config.warmup_steps, train_config.steps, train_config.min_lr_ratio)
    )
    step, train_tokens, train_time = 0, 0, 0.0
    if resuming:
        extra = load_checkpoint(checkpoint, model, optimizer, groups, restore_rng=True)
        scheduler.load_state_dict(extra["scheduler"])
        step, train_tokens, train_time = int(extra["step"]), int(extra["train_tokens"]), float(extra["train_time_s"])
        if groups.rank == 0:
            truncate_metrics(files.metrics, step)
    elif groups.rank == 0 and files.metrics.exists():
        files.metrics.unlink()
    runner = ExpertParallelStep(model, optimizer, groups, grad_clip=train_config.grad_clip, scheduler=scheduler)
    sampler = TrainSampler(corpus.tokens("train"), corpus.domain_labels("train"), train_config.seq_len,
                           train_config.batch_size, train_config.seed)

    def save() -> None:
        save_checkpoint(checkpoint, model, optimizer, groups, extra={
            "step": step, "train_tokens": train_tokens, "train_time_s": train_time,
            "scheduler": scheduler.state_dict(),
        })

    wall_start = time.perf_counter()
    model.train()
    is_main = groups.rank == 0
    progress = make_progress(console) if (show_progress and is_main) else None
    log = files.metrics.open("a") if is_main else None
    try:
        if progress is not None:
            progress.start()
            task = progress.add_task(f"{label} (EP={expert_parallel} x {groups.world_size} ranks)",
                                     total=train_config.steps, completed=step, loss="-", speed="-")
        while step < train_config.steps:
            step += 1
            start = time.perf_counter()
            micro = [sampler.batch(step, m) for m in range(train_config.grad_accum)]
            with collective_guard(groups, step):
                try:
                    result = runner([(b.inputs, b.targets) for b in micro], autocast(precision))
                except FloatingPointError as error:
                    raise RoutelabError(f"{error} (step {step}); lower lr (now {train_config.lr}) or use precision='fp32'. "
                                        "The last checkpoint is kept.") from None
            elapsed = time.perf_counter() - start
            train_tokens += train_config.tokens_per_step
            train_time += elapsed
            if log is not None and (step % train_config.log_every == 0 or step == train_config.steps):
                row = {"kind": "train", "step": step, "tokens": train_tokens, "lr": scheduler.get_last_lr()[0],
                       **result, "step_time_s": elapsed, "tokens_per_s": train_config.tokens_per_step / elapsed}
                log.write(json.dumps(row) + "\n")
                log.flush()
            if progress is not None:
                progress.update(task, completed=step, loss=f"{result['loss']:.3f}",
                                speed=f"{train_tokens / train_time:,.0f}")
            if step % train_config.checkpoint_every == 0 or step == train_config.steps:
                with collective_guard(groups, step):
                    save()
            if on_step_end is not None:
                on_step_end(step)
        state = gather_full_state(model, groups)
    finally:
        if progress is not None:
            progress.stop()
        if log is not None:
            log.close()
    if not is_main:
        return None
    return _finish(files, corpus, model_config, train_config, record, state, precision, step, train_tokens,
                   train_time, wall_start, label)


def _finish(files: RunFiles, corpus: PreparedCorpus, model_config: TinyLMConfig, train_config: TrainConfig,
            record: dict[str, Any], state: dict[str, torch.Tensor], precision: str, step: int, train_tokens: int,
            train_time: float, wall_start: float, label: str) -> dict[str, Any]:
    """Rank 0: evaluate the gathered model in one process and write model.pt and summary.json."""
    model = TinyLM(model_config)
    model.load_state_dict(state)
    val_tokens, val_labels = corpus.tokens("val"), corpus.domain_labels("val")
    val_set = eval_batches(val_tokens, val_labels, train_config.seq_len, train_config.batch_size, train_config.eval_tokens)
    probe = probe_batch(val_tokens, val_labels, train_config.seq_len, train_config.probe_sequences)
    collector = RoutingCollector()
    metrics, _, _ = evaluate(model, val_set, probe, corpus.domains, precision, collector)
    collector.save(files.val_routing, model.moe_layers)
    with files.metrics.open("a") as log:
        log.write(json.dumps({"kind": "eval", "step": step, "tokens": train_tokens, "routing_fluctuation": None,
                              **metrics}) + "\n")
    payload = {"version": FORMAT_VERSION, "model_config": record["model_config"], "train_config": record["train_config"],
               "corpus": record["corpus"], "tokenizer": corpus.tokenizer.to_json(), "parallel": record["parallel"]}
    atomic_save({**payload, "format": MODEL_FORMAT, "step": step, "model": model.state_dict()}, files.model)
    params = model.parameter_counts()
    final_eval = [r for r in read_metrics(files.metrics) if r["kind"] == "eval"][-1]
    summary = {
        "label": label, "router": model_config.router, "seed": train_config.seed, "steps": step,
        "train_tokens": train_tokens, "train_time_s": train_time,
        "train_tokens_per_s": train_tokens / train_time if train_time > 0 else None,
        "wall_time_s_last_session": time.perf_counter() - wall_start, "precision": precision,
        "params_total": params["total"], "params_active": params["active"], "moe_layers": model.moe_layers,
        "parallel": record["parallel"], "final_eval": final_eval,
    }
    write_json(files.summary, summary)
    if not train_config.keep_checkpoint:
        shutil.rmtree(files.root / DCP_CHECKPOINT, ignore_errors=True)
    return summary


def expert_parallel_command_run(
    folder: Path, corpus: PreparedCorpus, model_config: TinyLMConfig, train_config: TrainConfig,
    expert_parallel: int | None, llep_ratio: float | None, **kwargs: Any,
) -> dict[str, Any] | None:
    """What ``routelab train --expert-parallel N [--llep RATIO]`` runs on each rank."""
    if expert_parallel is None:
        raise ConfigError("--llep needs --expert-parallel N (LLEP balances experts that are spread over ranks).")
    llep = None if llep_ratio is None else LLEPConfig(lam=llep_ratio, min_chunk=1)
    try:
        return train_expert_parallel(folder, corpus, model_config, train_config, expert_parallel=expert_parallel,
                                     llep=llep, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
