"""MoE layer vs ideal grouped GEMM, naive loop and dense FFN (see docs/benchmarks.md).

Usage: python bench/moe_layer.py [--router mixtral] [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse

from routelab.core.cpu_allocator import tune_cpu_allocator_from_env
from routelab.bench.layer import run_layer_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--router", default="mixtral")
    parser.add_argument("--shapes", default="coarse,fine")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tune_cpu_allocator_from_env()  # see routelab/core/cpu_allocator.py; ROUTELAB_CPU_ALLOCATOR=system for A/B
    run_layer_benchmark(
        args.router, args.shapes.split(","), args.dtypes.split(","), tokens=args.tokens, repeats=args.repeats
    )


if __name__ == "__main__":
    main()
