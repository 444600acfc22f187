"""Expert parallelism on this machine: EP=2/4 gloo processes vs one process, LLEP vs standard
EP under Zipf-skewed routing (measured, and predicted by ``routelab.systems.ep`` calibrated
with the measured all-to-all and GEMM costs), and the calibrated model's 8- and 64-rank
prediction.

One MoE layer (SwiGLU experts, mixtral router), the same global batch in every setting:
one process runs all of it; with EP=N each of N processes runs 1/N of the tokens and holds
E/N experts. Times are medians over rounds, each the slowest rank's (every rank waits at a
barrier before a timed region). CPU processes share the machine's cores, so EP here
measures the overheads of the exchange, not a speed-up: say so when reporting.

Usage: python bench/expert_parallel.py [--tokens 4096] [--d-model 256] [--d-hidden 512]
       [--experts 8] [--top-k 2] [--rounds 7] [--zipf 1.2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import routelab
from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
from routelab.parallel import ExpertParallelMoE, LLEPConfig, route_global
from routelab.parallel.dispatch import exchange_weights
from routelab.parallel.spawn import run_workers
from routelab.systems.ep import EPCostModel, contiguous_placement, llep_plan, standard_plan, step_cost


class ZipfSkew(torch.nn.Module):
    """Wraps a scorer: adds ``strength * log p_e`` with ``p_e ~ 1/(e+1)^s`` to its logits, so
    that expert 0 is the most popular, expert 1 next, and so on."""

    def __init__(self, inner: torch.nn.Module, num_experts: int, s: float, strength: float = 1.0) -> None:
        super().__init__()
        self.inner = inner
        p = 1.0 / np.arange(1, num_experts + 1) ** s
        self.register_buffer("offset_E", torch.tensor(strength * np.log(p / p.sum()), dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, draft) -> torch.Tensor:  # noqa: ANN001
        return self.inner(x_TD, draft) + self.offset_E


def build_layer(args: argparse.Namespace, zipf: float) -> routelab.MoE:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, top_k=args.top_k,
                         router="mixtral")
    if zipf > 0:
        layer.router.scorer = ZipfSkew(layer.router.scorer, args.experts, zipf)
    return layer


def batch_of(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.tokens // 128, 128, args.d_model, generator=gen)


def timed(fn, group, rounds: int) -> float:  # noqa: ANN001
    """Median over rounds of the slowest rank's time of ``fn()``."""
    times = []
    for index in range(rounds + 2):
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        if index >= 2:
            times.append(float(elapsed))
    return statistics.median(times)


def ep_worker(rank: int, world: int, args: argparse.Namespace, zipf: float, llep: LLEPConfig | None) -> dict:
    group = dist.new_group(list(range(world)))
    layer = ExpertParallelMoE(build_layer(args, zipf), group, llep=llep)
    x = batch_of(args)
    share = x.shape[0] // world
    x_local = x[rank * share : (rank + 1) * share].clone().requires_grad_(True)

    def train_step() -> None:
        out = layer(x_local)
        out.y.square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            layer(x_local)

    step_s = timed(train_step, group, args.rounds)
    forward_s = timed(forward, group, args.rounds)
    # the parts of one forward, each timed alone on the data of the last forward
    x_TD, batch = layer.real_tokens(x_local.detach(), None, None)
    with torch.no_grad():
        local, global_routing, counts, _ = route_global(layer.router, x_TD, batch, group)
    plan = layer.last_plan
    payload = torch.randn(sum(plan.send_splits), args.d_model + 1)
    back = torch.randn(sum(plan.recv_splits), args.d_model)

    def routing() -> None:
        with torch.no_grad():
            route_global(layer.router, x_TD, batch, group)

    def all_to_all() -> None:
        received = torch.empty(sum(plan.recv_splits), args.d_model + 1)
        dist.all_to_all_single(received, payload, plan.recv_splits, plan.send_splits, group=group)
        returned = torch.empty(sum(plan.send_splits), args.d_model)
        dist.all_to_all_single(returned, back, plan.send_splits, plan.recv_splits, group=group)

    with torch.no_grad():
        w_in, w_out = exchange_weights(layer.experts.w_in_EDH, layer.experts.w_out_EHD, plan, group)

    def weights() -> None:
        with torch.no_grad():
            exchange_weights(layer.experts.w_in_EDH, layer.experts.w_out_EHD, plan, group)

    rows = torch.randn(int(plan.slot_counts.sum()), args.d_model)
    gates = torch.rand(rows.shape[0])

    def experts() -> None:
        with torch.no_grad():
            layer.experts.forward_sorted(rows, plan.slot_counts, gates, w_in_EDH=w_in, w_out_EHD=w_out)

    own_rows = int(plan.slot_counts.sum())
    rows_all = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(rows_all, torch.tensor([own_rows]), group=group)
    return {
        "step_s": step_s, "forward_s": forward_s, "routing_s": timed(routing, group, args.rounds),
        "a2a_s": timed(all_to_all, group, args.rounds), "weights_s": timed(weights, group, args.rounds),
        "experts_s": timed(experts, group, args.rounds),
        "a2a_bytes": 4 * max(max(sum(plan.send_splits), sum(plan.recv_splits)) * (args.d_model + 1), 1),
        "device_loads": plan.device_loads, "llep_applied": plan.llep_applied, "rows": [int(r) for r in rows_all],
        "topk_idx": global_routing.topk_idx.numpy() if rank == 0 else None,
        "load_max_mean": float(np.max(plan.device_loads) / max(np.mean(plan.device_loads), 1e-9)),
    }


def single_process(args: argparse.Namespace, zipf: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    layer = build_layer(args, zipf)
    x = batch_of(args).requires_grad_(True)

    def median(fn) -> float:  # noqa: ANN001
        times = []
        for index in range(args.rounds + 2):
            start = time.perf_counter()
            fn()
            if index >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def step() -> None:
        layer(x).y.square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    x_TD, batch = layer.real_tokens(x.detach(), None, None)
    with torch.no_grad():
        routing = layer.router(x_TD, batch)
    from routelab.moe import sort_by_expert

    order, counts_E = sort_by_expert(routing.topk_idx, args.experts)
    rows = x_TD.index_select(0, torch.div(order, routing.topk_idx.shape[1], rounding_mode="floor"))
    gates = torch.rand(rows.shape[0])

    def route() -> None:
        with torch.no_grad():
            layer.router(x_TD, batch)

    def experts() -> None:
        with torch.no_grad():
            layer.experts.forward_sorted(rows, counts_E, gates)

    return {"step_s": median(step), "forward_s": median(forward), "routing_s": median(route),
            "experts_s": median(experts), "rows": int(rows.shape[0])}


def calibrated_model(args: argparse.Namespace, result: dict) -> EPCostModel:
    """EPCostModel with this machine's constants: GEMM FLOP/s and per-GEMM overhead of one
    process, and the effective all-to-all bandwidth of gloo as measured (fp32 activations)."""
    rows = max(result["rows"])
    flops = 6.0 * args.d_model * args.d_hidden * rows / result["experts_s"]
    return EPCostModel(d_model=args.d_model, d_hidden=args.d_hidden, flops=flops, gemm_overhead_s=2e-5,
                       link_bandwidth=result["a2a_bytes"] / (result["a2a_s"] / 2), p2p_bandwidth=result["a2a_bytes"] / (result["a2a_s"] / 2),
                       act_bytes=4, weight_bytes=4)


def zipf_routing(num_tokens: int, num_experts: int, k: int, s: float, seed: int = 0) -> np.ndarray:
    """``[T, k]`` distinct experts per token drawn with probabilities ``~ 1/(e+1)^s``."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1) ** s
    p /= p.sum()
    keys = np.log(rng.random((num_tokens, num_experts))) / p  # weighted sampling without replacement
    return np.argsort(-keys, axis=1)[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--min-chunk", type=int, default=128, help="LLEP minimum GEMM rows m")
    args = parser.parse_args()
    tune_cpu_allocator_from_env()
    console = Console()
    cores = len(os.sched_getaffinity(0))
    console.print(f"{cores} cores; one layer D={args.d_model} H={args.d_hidden} E={args.experts} k={args.top_k}, "
                  f"{args.tokens} tokens per step (global), fp32, {args.rounds} rounds")

    # 1. EP=2 and EP=4 vs one process, balanced routing
    table = Table(title="one MoE layer, fwd+bwd, same global batch (times in ms; split = one forward)")
    for column in ("setting", "tokens/s", "x 1 proc", "step", "forward", "routing", "all-to-all (2x)", "expert GEMMs"):
        table.add_column(column, justify="right")
    base = single_process(args, 0.0, threads=1)
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    table.add_row("1 process, 1 thread", f"{args.tokens / base['step_s']:,.0f}", "1.00", ms(base["step_s"]),
                  ms(base["forward_s"]), ms(base["routing_s"]), "-", ms(base["experts_s"]))
    results = {}
    for world in (2, 4):
        r = run_workers(ep_worker, world, args, 0.0, None, timeout_s=900, collective_timeout_s=300)[0]
        results[world] = r
        table.add_row(f"EP={world}, {world} procs x 1 thread", f"{args.tokens / r['step_s']:,.0f}",
                      f"{base['step_s'] / r['step_s']:.2f}", ms(r["step_s"]), ms(r["forward_s"]), ms(r["routing_s"]),
                      ms(r["a2a_s"]), ms(r["experts_s"]))
    console.print(table)

    # 2. LLEP vs standard EP under Zipf skew: measured vs predicted
    llep = LLEPConfig(lam=1.3, alpha=1.0, min_chunk=args.min_chunk)
    model = calibrated_model(args, results[2])
    for world in (2, 4):
        std = run_workers(ep_worker, world, args, args.zipf, None, timeout_s=900, collective_timeout_s=300)[0]
        lle = run_workers(ep_worker, world, args, args.zipf, llep, timeout_s=900, collective_timeout_s=300)[0]
        idx = std["topk_idx"]
        loads = np.bincount(idx[idx >= 0], minlength=args.experts)
        predicted_std = step_cost(idx, standard_plan(loads, contiguous_placement(args.experts, world), world), world, model)
        predicted_llep = step_cost(idx, llep_plan(loads, world, llep), world, model)
        table = Table(title=f"EP={world}, Zipf s={args.zipf} routing: LLEP (lam 1.3, alpha 1, m {args.min_chunk}) vs "
                            "standard EP (ms; split = one forward)")
        for column in ("", "max/mean rank load", "fwd+bwd", "forward", "routing", "all-to-all (2x)", "weights",
                       "expert GEMMs", "predicted forward"):
            table.add_column(column, justify="right")
        for name, r, p in (("standard EP", std, predicted_std), ("LLEP", lle, predicted_llep)):
            table.add_row(name, f"{r['load_max_mean']:.2f}", ms(r["step_s"]), ms(r["forward_s"]), ms(r["routing_s"]),
                          ms(r["a2a_s"]), ms(r["weights_s"]) if r["llep_applied"] else "-", ms(r["experts_s"]), ms(p.time_s))
        table.add_row("standard / LLEP", "", f"{std['step_s'] / lle['step_s']:.2f}", f"{std['forward_s'] / lle['forward_s']:.2f}",
                      "", "", "", f"{std['experts_s'] / lle['experts_s']:.2f}", f"{predicted_std.time_s / predicted_llep.time_s:.2f}")
        console.print(table)
        console.print(f"expert loads (tokens*k): {loads.tolist()}; rank loads standard {std['device_loads']}, "
                      f"LLEP {lle['device_loads']} (applied: {lle['llep_applied']})")
    console.print(f"calibration (EP=2 run): GEMM {model.flops / 1e9:.1f} GFLOP/s per process, all-to-all "
                  f"{model.link_bandwidth / 1e6:.0f} MB/s per rank (gloo, {results[2]['a2a_bytes'] / 1e6:.2f} MB per "
                  f"rank and direction in {1e3 * results[2]['a2a_s'] / 2:.1f} ms)")

    # 3. prediction: 8 and 64 ranks with the calibrated constants (one rank per core, same link)
    table = Table(title="PREDICTION (calibrated cost model, not measured): E=64, k=2, 4096 tokens per rank")
    for column in ("ranks", "skew", "standard ms", "LLEP ms", "speed-up", "tokens/s standard", "tokens/s LLEP"):
        table.add_column(column, justify="right")
    for ranks in (8, 64):
        for s in (0.0, args.zipf):
            idx = zipf_routing(4096 * ranks, 64, 2, s)
            loads = np.bincount(idx.reshape(-1), minlength=64)
            a = step_cost(idx, standard_plan(loads, contiguous_placement(64, ranks), ranks), ranks, model).time_s
            b = step_cost(idx, llep_plan(loads, ranks, LLEPConfig(min_chunk=args.min_chunk)), ranks, model).time_s
            table.add_row(str(ranks), f"zipf {s}" if s else "uniform", ms(a), ms(b), f"{a / b:.2f}",
                          f"{4096 * ranks / a:,.0f}", f"{4096 * ranks / b:,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
