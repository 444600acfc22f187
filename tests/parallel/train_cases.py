"""Worker functions for the EP x DP TinyLM training tests (run in spawned processes)."""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist

from routelab.models.tinylm import TinyLM, TinyLMConfig
from routelab.parallel.checkpoint import load_checkpoint, save_checkpoint
from routelab.parallel.groups import build_groups
from routelab.parallel.model import expert_parameter_names, parallelize_moe_layers
from routelab.parallel.trainer import ExpertParallelStep, check_same_config

BATCH, SEQ, VOCAB = 4, 16, 64


def tiny_config(router: str = "deepseek-v3") -> TinyLMConfig:
    return TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ, num_experts=4,
                        top_k=2, router=router)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def optimizer_of(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def full_state(model: torch.nn.Module, groups) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The single-process state dict: expert shards gathered over the EP group."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in expert_parameter_names(model):
        parts = [torch.empty_like(state[name]) for _ in range(groups.ep_size)]
        dist.all_gather(parts, state[name].contiguous(), group=groups.ep_group)
        state[name] = torch.cat(parts)
    return state


def build(ep: int, router: str, timeout_s: float = 30):  # noqa: ANN201
    groups = build_groups(ep, timeout_s=timeout_s)
    torch.manual_seed(0)
    model = TinyLM(tiny_config(router))
    parallelize_moe_layers(model, groups)
    optimizer = optimizer_of(model)
    return groups, model, optimizer, ExpertParallelStep(model, optimizer, groups, grad_clip=1.0)


def train_and_resume(rank: int, world: int, ep: int, router: str, steps: int, folder: str) -> dict:
    """``steps`` steps straight; then steps/2, checkpoint, a fresh model resumed for the rest."""
    groups, model, optimizer, step = build(ep, router)
    losses = [step([batch(s)])["loss"] for s in range(steps)]
    straight = full_state(model, groups)
    save_checkpoint(os.path.join(folder, "final"), model, optimizer, groups, extra={"step": steps})
    groups, model, optimizer, step = build(ep, router)
    for s in range(steps // 2):
        step([batch(s)])
    save_checkpoint(os.path.join(folder, "half"), model, optimizer, groups, extra={"step": steps // 2})
    groups, model, optimizer, step = build(ep, router)
    extra = load_checkpoint(os.path.join(folder, "half"), model, optimizer, groups, restore_rng=True)
    for s in range(extra["step"], steps):
        step([batch(s)])
    resumed = full_state(model, groups)
    resume_error = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
    return {"losses": losses, "state": straight if rank == 0 else None, "resume_error": resume_error}


def train_only(rank: int, world: int, ep: int, router: str, steps: int) -> dict:
    groups, model, optimizer, step = build(ep, router)
    losses = [step([batch(s)])["loss"] for s in range(steps)]
    state = full_state(model, groups)  # collective: every rank takes part
    return {"losses": losses, "state": state if rank == 0 else None, "dp_size": groups.dp_size}


def train_routers(rank: int, world: int, routers: list[str], steps: int) -> dict[str, list[float]]:
    """``steps`` EP=world training steps per router (one process group for all of them)."""
    out = {}
    for router in routers:
        groups, model, optimizer, step = build(world, router)
        out[router] = [step([batch(s)])["loss"] for s in range(steps)]
    return out


def load_into_ep(rank: int, world: int, ep: int, router: str, path: str) -> dict:
    """Load a checkpoint (written by anything) under EP=``ep`` and return the gathered state."""
    groups, model, optimizer, _ = build(ep, router)
    load_checkpoint(path, model, optimizer, groups)
    moments = {}
    for name in expert_parameter_names(model):
        param = dict(model.named_parameters())[name]
        moments[name] = optimizer.state[param]["exp_avg"].clone()
    return {"state": full_state(model, groups), "moments": moments, "local_experts": groups.ep_rank}


def mismatched_config(rank: int, world: int) -> str:
    groups = build_groups(world, timeout_s=30)
    try:
        check_same_config({"router": "mixtral" if rank == 0 else "hash", "steps": 20}, groups)
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return "accepted"


def dies_or_hangs(rank: int, world: int, mode: str) -> str:
    """Rank 1 dies (or hangs) at step 2; the others must fail with an error naming it."""
    from routelab.parallel.watchdog import collective_guard

    groups, model, optimizer, step = build(world, "mixtral", timeout_s=4)
    for s in range(4):
        if rank == 1 and s == 2:
            if mode == "die":
                os._exit(3)
            time.sleep(600)
        with collective_guard(groups, step=s):
            step([batch(s)])
    return "finished"


def reference_training(router: str, steps: int) -> tuple[list[float], dict, TinyLM, torch.optim.Optimizer]:
    """The oracle: one process, the whole batch, AdamW, clipping, end_of_step."""
    import routelab

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a shared 2-core machine is slow with more
    torch.manual_seed(0)
    model = TinyLM(tiny_config(router))
    optimizer = optimizer_of(model)
    losses = []
    for s in range(steps):
        inputs, targets = batch(s)
        out = model(inputs, targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        routelab.end_of_step(model)
        losses.append(float(out.loss.detach()))
    torch.set_num_threads(threads)
    return losses, copy.deepcopy(model.state_dict()), model, optimizer
