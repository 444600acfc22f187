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

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import routelab
from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
from routelab.parallel import ExpertParallelMoE, LLEPConfig, route_global
from routelab.parallel.dispatch import exchange_weights
from routelab.parallel.replay_timing import slowest_rank_time
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


class Variant:
    """One layer setting inside a worker, with the callables the rounds time."""

    def __init__(self, args: argparse.Namespace, group, world: int, rank: int, zipf: float,  # noqa: ANN001
                 llep: LLEPConfig | None) -> None:
        self.layer = ExpertParallelMoE(build_layer(args, zipf), group, llep=llep)
        x = batch_of(args)
        share = x.shape[0] // world
        self.x = x[rank * share : (rank + 1) * share].clone().requires_grad_(True)
        self.group, self.args = group, args
        with torch.no_grad():
            self.layer(self.x)
        self.prepare_parts()

    def step(self) -> None:
        self.layer(self.x).y.square().mean().backward()

    def forward(self) -> None:
        with torch.no_grad():
            self.layer(self.x)

    def prepare_parts(self) -> None:
        """Inputs of the parts of one forward, each timed alone: routing, the two token
        all-to-alls, LLEP's weight exchange, the expert GEMMs."""
        args, layer, group = self.args, self.layer, self.group
        self.x_TD, self.batch = layer.real_tokens(self.x.detach(), None, None)
        with torch.no_grad():
            _, self.global_routing, _, _ = route_global(layer.router, self.x_TD, self.batch, group)
        plan = self.plan = layer.last_plan
        self.payload = torch.randn(sum(plan.send_splits), args.d_model + 1)
        self.back = torch.randn(sum(plan.recv_splits), args.d_model)
        with torch.no_grad():
            self.w_in, self.w_out = exchange_weights(layer.experts.w_in_EDH, layer.experts.w_out_EHD, plan, group)
        self.rows = torch.randn(int(plan.slot_counts.sum()), args.d_model)
        self.gates = torch.rand(self.rows.shape[0])

    def routing(self) -> None:
        with torch.no_grad():
            route_global(self.layer.router, self.x_TD, self.batch, self.group)

    def all_to_all(self) -> None:
        plan, d = self.plan, self.args.d_model
        received = torch.empty(sum(plan.recv_splits), d + 1)
        dist.all_to_all_single(received, self.payload, plan.recv_splits, plan.send_splits, group=self.group)
        returned = torch.empty(sum(plan.send_splits), d)
        dist.all_to_all_single(returned, self.back, plan.send_splits, plan.recv_splits, group=self.group)

    def weights(self) -> None:
        with torch.no_grad():
            exchange_weights(self.layer.experts.w_in_EDH, self.layer.experts.w_out_EHD, self.plan, self.group)

    def experts(self) -> None:
        with torch.no_grad():
            self.layer.experts.forward_sorted(self.rows, self.plan.slot_counts, self.gates, w_in_EDH=self.w_in,
                                              w_out_EHD=self.w_out)

    def summary(self) -> dict:
        plan, d = self.plan, self.args.d_model
        rows = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, torch.tensor([int(plan.slot_counts.sum())]), group=self.group)
        return {
            "a2a_bytes": 4 * max(sum(plan.send_splits), sum(plan.recv_splits)) * (d + 1),
            "device_loads": plan.device_loads, "llep_applied": plan.llep_applied, "rows": [int(r) for r in rows],
            "load_max_mean": float(np.max(plan.device_loads) / max(np.mean(plan.device_loads), 1e-9)),
            "topk_idx": self.global_routing.topk_idx.numpy(),
        }


PARTS = ("step", "forward", "routing", "all_to_all", "weights", "experts")


def ep_worker(rank: int, world: int, args: argparse.Namespace, zipf: float, with_llep: bool) -> dict:
    """Times, round after round and in turn (so that load changes hit every setting alike):
    standard EP, and either LLEP (``with_llep``) or the single-process layer on the whole
    global batch in rank 0 while the other ranks wait. Returns per-round times of every part."""
    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    variants = {"standard": Variant(args, group, world, rank, zipf, None)}
    if with_llep:
        variants["llep"] = Variant(args, group, world, rank, zipf,
                                   LLEPConfig(lam=1.3, alpha=1.0, min_chunk=args.min_chunk))
    single = None if with_llep else build_layer(args, zipf)
    x_all = batch_of(args).requires_grad_(True)
    times: dict[str, dict[str, list[float]]] = {name: {part: [] for part in PARTS} for name in variants}
    times["single"] = {"step": [], "forward": []}

    def single_step() -> None:
        single(x_all).y.square().mean().backward()

    def single_forward() -> None:
        with torch.no_grad():
            single(x_all)

    for index in range(args.rounds + 1):
        for name, variant in variants.items():
            for part in PARTS:
                elapsed = slowest_rank_time(getattr(variant, part), group)
                if index:  # the first round warms up
                    times[name][part].append(elapsed)
        if single is not None:
            for part, fn in (("step", single_step), ("forward", single_forward)):
                elapsed = slowest_rank_time(fn, group, alone=True)
                if index:
                    times["single"][part].append(elapsed)
    return {"times": times, **{name: v.summary() for name, v in variants.items()}}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b (per-round ratios cancel load that changes between rounds)."""
    return statistics.median(x / y for x, y in zip(a, b))


def calibrated_model(args: argparse.Namespace, summary: dict, times: dict) -> EPCostModel:
    """EPCostModel with this machine's constants: the GEMM FLOP/s of one process (forward
    expert GEMMs of the busiest rank) and gloo's effective all-to-all bandwidth, both as
    measured; fp32 activations and weights."""
    flops = 6.0 * args.d_model * args.d_hidden * max(summary["rows"]) / median(times["experts"])
    bandwidth = summary["a2a_bytes"] / (median(times["all_to_all"]) / 2)
    return EPCostModel(d_model=args.d_model, d_hidden=args.d_hidden, flops=flops, gemm_overhead_s=2e-5,
                       link_bandwidth=bandwidth, p2p_bandwidth=bandwidth, act_bytes=4, weight_bytes=4)


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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--min-chunk", type=int, default=128, help="LLEP minimum GEMM rows m")
    args = parser.parse_args()
    tune_cpu_allocator_from_env()
    console = Console()
    cores = len(os.sched_getaffinity(0))
    console.print(f"{cores} cores; one layer D={args.d_model} H={args.d_hidden} E={args.experts} k={args.top_k}, "
                  f"{args.tokens} tokens per step (global), fp32, {args.rounds} rounds")

    # 1. EP=2 and EP=4 vs one process (same global batch, balanced routing), timed in turn
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    table = Table(title="one MoE layer, same global batch; medians over rounds, ms (split = one forward, each part alone)")
    for column in ("setting", "tokens/s fwd+bwd", "EP / 1 proc speed (per-round)", "fwd+bwd", "forward", "routing",
                   "all-to-all (2x)", "expert GEMMs"):
        table.add_column(column, justify="right")
    runs = {}
    for world in (2, 4):
        runs[world] = run_workers(ep_worker, world, args, 0.0, False, timeout_s=1800, collective_timeout_s=600)[0]
        t = runs[world]["times"]
        table.add_row(f"1 process (in the EP={world} job)", f"{args.tokens / median(t['single']['step']):,.0f}", "1.00",
                      ms(median(t["single"]["step"])), ms(median(t["single"]["forward"])), "", "-", "")
        s = t["standard"]
        table.add_row(f"EP={world} ({world} processes)", f"{args.tokens / median(s['step']):,.0f}",
                      f"{ratio(t['single']['step'], s['step']):.2f}", ms(median(s["step"])), ms(median(s["forward"])),
                      ms(median(s["routing"])), ms(median(s["all_to_all"])), ms(median(s["experts"])))
    console.print(table)
    model = calibrated_model(args, runs[2]["standard"], runs[2]["times"]["standard"])

    # 2. LLEP vs standard EP under Zipf skew, timed in turn: measured vs predicted
    llep = LLEPConfig(lam=1.3, alpha=1.0, min_chunk=args.min_chunk)
    for world in (2, 4):
        run = run_workers(ep_worker, world, args, args.zipf, True, timeout_s=1800, collective_timeout_s=600)[0]
        t = run["times"]
        idx = run["standard"]["topk_idx"]
        loads = np.bincount(idx[idx >= 0], minlength=args.experts)
        predicted = {
            "standard": step_cost(idx, standard_plan(loads, contiguous_placement(args.experts, world), world), world, model),
            "llep": step_cost(idx, llep_plan(loads, world, llep), world, model),
        }
        table = Table(title=f"EP={world}, Zipf s={args.zipf} routing: LLEP (lam 1.3, alpha 1, m {args.min_chunk}) vs "
                            "standard EP; medians over rounds, ms")
        for column in ("", "max/mean rank load", "fwd+bwd", "forward", "routing", "all-to-all (2x)", "weights",
                       "expert GEMMs", "predicted forward"):
            table.add_column(column, justify="right")
        for name in ("standard", "llep"):
            r, tt = run[name], t[name]
            table.add_row("standard EP" if name == "standard" else "LLEP", f"{r['load_max_mean']:.2f}",
                          ms(median(tt["step"])), ms(median(tt["forward"])), ms(median(tt["routing"])),
                          ms(median(tt["all_to_all"])), ms(median(tt["weights"])) if r["llep_applied"] else "-",
                          ms(median(tt["experts"])), ms(predicted[name].time_s))
        table.add_row("standard / LLEP (per-round)", "", f"{ratio(t['standard']['step'], t['llep']['step']):.2f}",
                      f"{ratio(t['standard']['forward'], t['llep']['forward']):.2f}", "", "", "",
                      f"{ratio(t['standard']['experts'], t['llep']['experts']):.2f}",
                      f"{predicted['standard'].time_s / predicted['llep'].time_s:.2f}")
        console.print(table)
        console.print(f"expert loads (tokens*k): {loads.tolist()}; rank loads standard {run['standard']['device_loads']}, "
                      f"LLEP {run['llep']['device_loads']}")
    console.print(f"calibration (EP=2, balanced): GEMM {model.flops / 1e9:.1f} GFLOP/s per process, all-to-all "
                  f"{model.link_bandwidth / 1e6:.0f} MB/s per rank (gloo; "
                  f"{runs[2]['standard']['a2a_bytes'] / 1e6:.2f} MB per rank and direction)")

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
