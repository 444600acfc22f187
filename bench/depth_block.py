"""Mixture-of-Depths block speed: does skipping tokens save real time?

One pre-norm transformer block (d_model 512, 8 heads, SwiGLU FFN of width 2048) on 4096
tokens (8 sequences x 512), forward + backward, run densely and as a MoD block
(``routelab.depth`` MoD with one routed layer) at capacities 12.5 % and 50 %. The FLOP
ratio is the analytic count of what each variant executed (``FlopCounter``: projections,
attention over the selected tokens only, FFN, router); the time ratio is measured. Each
round times the dense block and every MoD variant in turn, so machine load hits all alike;
the per-round ratio's median is reported. Target: time ratio within 1.3x of the FLOP ratio.

Usage: python bench/depth_block.py [--rounds 7] [--threads N] [--tokens 4096] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from routelab.core.context import RoutingContext
from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
from routelab.depth.blocks import run_block
from routelab.depth.flops import FlopCounter
from routelab.depth.mod import MoDStack
from routelab.models.tinylm import Block, TinyLMConfig, rotary_tables


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--capacities", default="0.125,0.5")
    args = parser.parse_args()
    if args.tokens % args.seq_len:
        parser.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
    return args


def main() -> None:
    args = parse()
    tune_cpu_allocator_from_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TinyLMConfig(vocab_size=16, d_model=args.d_model, n_layers=1, n_heads=8, max_seq_len=args.seq_len, ffn="dense")
    block = Block(config, 0, None)
    cos, sin = rotary_tables(args.seq_len, args.d_model // 8, config.rope_base)
    batch = args.tokens // args.seq_len
    x = torch.randn(batch, args.seq_len, args.d_model, requires_grad=True)
    upstream = torch.randn(batch, args.seq_len, args.d_model)
    capacities = [float(c) for c in args.capacities.split(",")]
    stacks = {c: MoDStack(args.d_model, 1, capacity=c, layers=[0]).train() for c in capacities}
    blocks = torch.nn.ModuleList([block])

    def dense() -> FlopCounter:
        counter = FlopCounter()
        y, _ = run_block(block, x, cos, sin, None, RoutingContext(), counter, "swiglu")
        y.backward(upstream)
        return counter

    def mod(capacity: float) -> FlopCounter:
        y, result = stacks[capacity](blocks, x, cos, sin, None, None, RoutingContext())
        y.backward(upstream)
        return result.flops

    variants = {"dense": dense, **{f"MoD {c:.1%}": (lambda c=c: mod(c)) for c in capacities}}
    flops = {name: fn().total for name, fn in variants.items()}  # also the warm-up
    for fn in variants.values():
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in variants if name != "dense"}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        measured = {}
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            measured[name] = time.perf_counter() - start
            times[name].append(measured[name])
        for name in ratios:
            ratios[name].append(measured[name] / measured["dense"])
    table = Table(title=f"MoD block vs dense block, fwd+bwd, d={args.d_model}, {args.tokens} tokens "
                        f"({batch} x {args.seq_len}), {torch.get_num_threads()} thread(s), {args.rounds} rounds")
    for column in ("variant", "median ms", "FLOP ratio", "time ratio", "time / FLOP ratio"):
        table.add_column(column, justify="right")
    table.add_row("dense", f"{1e3 * statistics.median(times['dense']):.1f}", "1.000", "1.000", "-")
    for name, values in ratios.items():
        flop_ratio = flops[name] / flops["dense"]
        time_ratio = statistics.median(values)
        table.add_row(name, f"{1e3 * statistics.median(times[name]):.1f}", f"{flop_ratio:.3f}", f"{time_ratio:.3f}",
                      f"{time_ratio / flop_ratio:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
