"""Router cost of the transport routers in the settings `routelab bench` cannot select.

`routelab bench --routers ssr` times SSR with its default p_sel = 0.01, i.e. almost always
the softmax path. This script times, as a share of the same MoE layer's forward+backward
(fp32, one sequence of --tokens tokens):

* ssr with p_sel = 1 (Sinkhorn on every forward), gradients unrolled and detached;
* base cold (auction prices from the entropic relaxation, the default), cold with
  eps-scaling from zero prices, and warm (prices of the previous step, on another batch).

Usage: python bench/transport_routers.py [--tokens 4096] [--repeats 3] [--shapes coarse,fine]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from routelab import MoE, end_of_step
from routelab.bench.layer import shape_by_name
from routelab.bench.timing import median_time
from routelab.core.context import TokenBatch
from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
from routelab.core.validation import inputs_checked_by_layer

SETTINGS = {
    "ssr p_sel=1 unrolled": ("ssr", {"p_sel": 1.0}, False),
    "ssr p_sel=1 detach": ("ssr", {"p_sel": 1.0, "sinkhorn_grad": "detach"}, False),
    "base cold (entropic init)": ("base", {"warm_start": False}, False),
    "base cold (zero init, eps-scaling)": ("base", {"warm_start": False, "auction_init": "zero"}, False),
    "base warm (previous step's prices)": ("base", {}, True),
}


def share(name: str, options: dict, warm: bool, shape_name: str, tokens: int, repeats: int) -> tuple[float, float]:
    shape = shape_by_name(shape_name)
    torch.manual_seed(0)
    layer = MoE(d_model=shape.d_model, d_hidden=shape.d_hidden, num_experts=shape.num_experts, top_k=shape.top_k,
                router=name, **options)
    x = torch.randn(1, tokens, shape.d_model, requires_grad=True)
    batch = TokenBatch.from_mask(1, tokens, None)
    if warm:
        layer.router(torch.randn(tokens, shape.d_model), batch)
        end_of_step(layer)

    def run_layer() -> None:
        out = layer(x)
        (out.y.float().square().mean() + out.aux_loss).backward()
        layer.zero_grad(set_to_none=True)

    def run_router() -> None:
        with inputs_checked_by_layer():  # the router's cost inside its layer, which checks the input once
            routing = layer.router(x[0], batch)
        loss = routing.topk_weight.sum() + routing.aux_loss
        if loss.requires_grad:
            loss.backward()
        layer.zero_grad(set_to_none=True)

    layer_s = median_time(run_layer, repeats=repeats)
    router_s = median_time(run_router, repeats=repeats)
    return router_s / layer_s, layer_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="coarse,fine")
    args = parser.parse_args()
    tune_cpu_allocator_from_env()  # see routelab/core/cpu_allocator.py; ROUTELAB_CPU_ALLOCATOR=system for A/B
    shapes = [s for s in args.shapes.split(",") if s]
    table = Table(title=f"Transport routers: router share of layer time (fp32 fwd+bwd, {args.tokens} tokens)")
    table.add_column("setting")
    for s in shapes:
        table.add_column(f"{s} share", justify="right")
        table.add_column(f"{s} layer ms", justify="right")
    for label, (name, options, warm) in SETTINGS.items():
        cells = []
        for s in shapes:
            frac, layer_s = share(name, options, warm, s, args.tokens, args.repeats)
            cells += [f"{frac:.1%}", f"{layer_s * 1e3:.1f}"]
        table.add_row(label, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
