"""LoRA-expert layer benchmark (see docs/benchmarks.md, "Adapter layer").

Forward+backward, in one run, of a frozen ``nn.Linear`` (d -> d) with E routed LoRA experts
of rank r (top-k, ``mixtral`` router, grouped-GEMM dispatch), against:

- ``base``: the frozen linear alone (the input needs a gradient, as inside a network);
- ``masked loop``: the same experts and routing, one masked sub-batch per adapter (the
  pattern of peft's multi-adapter forward), plus the same router;
- ``dispatch only`` / ``dense dispatch only`` / ``loop only``: the adapter paths on a
  fixed routing (no router): grouped GEMM, the dense all-experts path, the masked loop;
  ``router ms`` is routed minus dispatch only.

Usage: python bench/adapter_layer.py [--tokens 4096] [--d-model 512] [--rank 16] [--experts 8]
       [--top-k 2] [--dtypes float32,bfloat16] [--repeats 7] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from routelab.adapters import attach_adapters, routed_delta
from routelab.bench.timing import median_time
from routelab.core.cpu_allocator import tune_cpu_allocator_from_env

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def masked_loop_delta(x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, bank) -> torch.Tensor:  # noqa: ANN001
    """One adapter at a time: find its tokens with a mask, run its LoRA on them, accumulate."""
    out = x_TD.new_zeros(x_TD.shape[0], bank.d_out)
    for expert in range(bank.num_experts):
        token_idx, slot = torch.where(idx_TK == expert)
        if token_idx.numel() == 0:
            continue
        y = bank.expert_delta(expert, x_TD[token_idx]) * weight_TK[token_idx, slot, None].to(x_TD.dtype)
        out = out.index_add(0, token_idx, y)
    return out


def run(args: argparse.Namespace) -> None:
    console = Console(width=200)
    device = torch.device(args.device)
    table = Table(title=f"LoRA-expert layer fwd+bwd: d={args.d_model}, r={args.rank}, E={args.experts}, "
                        f"top-{args.top_k}, {args.tokens} tokens, {torch.get_num_threads()} thread(s), {device.type}")
    for column in ("dtype", "base ms", "routed ms", "added / base", "masked loop ms", "speed-up vs loop",
                   "dispatch only ms", "dense dispatch only ms", "loop only ms", "router ms"):
        table.add_column(column, justify="right")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(args.d_model, args.d_model, bias=False)).to(device, dtype)
        adapters = attach_adapters(model, ["0"], num_experts=args.experts, rank=args.rank, top_k=args.top_k,
                                   router="mixtral", init_b_std=0.02)
        layer = adapters.layers["0"].to(device, dtype)
        bank, router = layer.bank, layer.router
        adapters.state.records = None
        x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
        upstream = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype)
        from routelab.adapters.layer import token_batch

        batch = token_batch((args.tokens,), None, device)
        with torch.no_grad():
            fixed = router(x.detach(), batch, None)

        def backward(y: torch.Tensor) -> None:
            y.backward(upstream)
            x.grad = None
            for p in adapters.trainable_parameters():
                p.grad = None

        def base() -> None:
            backward(layer.base(x))

        def routed() -> None:
            backward(layer(x))

        def loop() -> None:
            routing = router(x, batch, None)
            backward(layer.base(x) + masked_loop_delta(x, routing.topk_idx, routing.topk_weight, bank))

        def dispatch_only() -> None:
            backward(layer.base(x) + routed_delta(x, fixed.topk_idx, fixed.topk_weight, bank))

        def dense_only() -> None:
            backward(layer.base(x) + routed_delta(x, fixed.topk_idx, fixed.topk_weight, bank, "dense"))

        def loop_only() -> None:
            backward(layer.base(x) + masked_loop_delta(x, fixed.topk_idx, fixed.topk_weight, bank))

        variants = {"base": base, "routed": routed, "loop": loop, "dispatch": dispatch_only, "dense": dense_only,
                    "loop_only": loop_only}
        for fn in variants.values():  # warm-up
            fn()
            fn()
        samples: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.repeats):  # round-robin, so that load changes hit every variant alike
            for label, fn in variants.items():
                samples[label].append(median_time(fn, repeats=1, warmup=0))
        times = {label: statistics.median(values) for label, values in samples.items()}
        base_t = times["base"]
        router_t = times["routed"] - times["dispatch"]
        table.add_row(
            name, f"{base_t * 1e3:.2f}", f"{times['routed'] * 1e3:.2f}", f"{(times['routed'] - base_t) / base_t:.2f}x",
            f"{times['loop'] * 1e3:.2f}", f"{times['loop'] / times['routed']:.2f}x",
            f"{times['dispatch'] * 1e3:.2f}", f"{times['dense'] * 1e3:.2f}", f"{times['loop_only'] * 1e3:.2f}",
            f"{router_t * 1e3:.2f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator_from_env()
    run(args)


if __name__ == "__main__":
    main()
