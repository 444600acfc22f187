"""TinyLM training throughput: MoE against the dense TinyLM with the same active parameters.

Three models share everything but the FFN: dense (hidden width ``k * h``), coarse MoE
(8 experts of width ``h``, top-2) and fine-grained MoE (64 experts of width ``h / 4``,
top-8); all three have the same active FFN parameters per token. One training step
(forward, backward, the lab's AdamW) of each is timed in turn, round after round, so that a change
of machine load hits all of them alike; the ratio MoE / dense is taken per round and the
median reported. Target: MoE at least 0.8x the dense tokens/s.

Usage: python bench/tinylm.py [--rounds 12] [--precisions fp32,bf16] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
from routelab.lab.config import TrainConfig
from routelab.lab.evaluation import autocast
from routelab.lab.train import build_optimizer
from routelab.models.tinylm import TinyLM, TinyLMConfig


def configs(args: argparse.Namespace) -> dict[str, TinyLMConfig]:
    common = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                  max_seq_len=args.seq_len, router=args.router)
    h = args.expert_width
    return {
        "dense": TinyLMConfig(**common, ffn="dense", d_ff=2 * h),
        "moe E8 k2": TinyLMConfig(**common, num_experts=8, top_k=2, expert_d_hidden=h),
        "moe E64 k8": TinyLMConfig(**common, num_experts=64, top_k=8, expert_d_hidden=h // 4),
    }


class Stepper:
    """One model with its optimizer and a fixed batch; ``step()`` runs one training step."""

    def __init__(self, config: TinyLMConfig, batch: int, precision: str) -> None:
        torch.manual_seed(0)
        self.model = TinyLM(config)
        self.optimizer = build_optimizer(self.model, TrainConfig(lr=1e-4))  # the lab's optimizer (fused AdamW)
        ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1))
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]
        self.precision = precision
        self.tokens = batch * config.max_seq_len

    def step(self) -> float:
        start = time.perf_counter()
        with autocast(self.precision):
            out = self.model(self.inputs, self.targets)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def profile(stepper: Stepper, console: Console) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    stepper.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            stepper.step()
    console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="mixtral")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--expert-width", type=int, default=512, help="h: coarse expert width (dense width 2h)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per model")
    args = parser.parse_args()
    tune_cpu_allocator_from_env()  # see routelab/core/cpu_allocator.py; ROUTELAB_CPU_ALLOCATOR=system for A/B
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"TinyLM training throughput (d={args.d_model}, L={args.layers}, {args.batch}x{args.seq_len} "
                        f"tokens/step, router {args.router}, {torch.get_num_threads()} threads)")
    for column in ("precision", "model", "params (total / active)", "tokens/s (median)", "x dense (median of rounds)"):
        table.add_column(column, justify="right")
    for precision in args.precisions.split(","):
        steppers = {name: Stepper(cfg, args.batch, precision) for name, cfg in configs(args).items()}
        for stepper in steppers.values():
            for _ in range(args.warmup):
                stepper.step()
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for _ in range(args.rounds):
            for name, stepper in steppers.items():
                times[name].append(stepper.step())
        for name, stepper in steppers.items():
            counts = stepper.model.parameter_counts()
            ratios = [d / t for d, t in zip(times["dense"], times[name])]
            table.add_row(precision, name, f"{counts['total'] / 1e6:.2f}M / {counts['active'] / 1e6:.2f}M",
                          f"{stepper.tokens / statistics.median(times[name]):,.0f}", f"{statistics.median(ratios):.2f}")
            if args.profile:
                console.print(f"[bold]{precision} {name}[/]")
                profile(stepper, console)
    console.print(table)


if __name__ == "__main__":
    main()
