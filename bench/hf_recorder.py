"""Overhead of routelab on the forward time of a tiny transformers Mixtral (see docs/benchmarks.md).

Times, in one run and interleaved, ``model(input_ids)`` under ``torch.no_grad()`` for
the bare model, the model with ``routelab.models.hf.attach`` (load counting only), and
the attached model recording every forward into a routing trace on disk. Each sample is
``--forwards`` forwards; the median of ``--repeats`` samples is reported, with the ratio
to the bare model.

Usage: python bench/hf_recorder.py [--tokens 1024] [--hidden 256] [--repeats 9] [--forwards 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from routelab.core.cpu_allocator import tune_cpu_allocator_from_env  # noqa: E402


def tiny_mixtral(hidden: int, layers: int, experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    return MixtralForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per forward (batch of 256-token sequences)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--forwards", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0 = torch's default); 1 keeps the ratio stable on a shared machine")
    args = parser.parse_args()
    tune_cpu_allocator_from_env()  # see routelab/core/cpu_allocator.py; ROUTELAB_CPU_ALLOCATOR=system for A/B
    if args.threads:
        torch.set_num_threads(args.threads)

    from routelab.models.hf import attach, record
    from routelab.traces import TraceWriter

    model = tiny_mixtral(args.hidden, args.layers, args.experts)
    seq = min(256, args.tokens)
    input_ids = torch.randint(0, 2048, (max(args.tokens // seq, 1), seq), generator=torch.Generator().manual_seed(1))

    def forwards() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.forwards):
                model(input_ids)
        return time.perf_counter() - start

    def bare() -> float:
        return forwards()

    def attached() -> float:
        with attach(model):
            return forwards()

    with tempfile.TemporaryDirectory() as tmp:
        writer = TraceWriter(os.path.join(tmp, "bench.trace"), {"model": "tiny-mixtral"}, args.layers, args.experts)

        def recording() -> float:
            with attach(model) as handle, record(handle, writer):
                return forwards()

        setups = {"bare model": bare, "attached (load counting)": attached, "attached + trace recorder": recording}
        for run in setups.values():  # warm-up
            run()
        samples: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(args.repeats):  # interleaved, so that load changes hit every setup alike
            for name, run in setups.items():
                samples[name].append(run())
        writer.close()
        recorded = writer.num_tokens

    bare_median = statistics.median(samples["bare model"])
    tokens = input_ids.numel() * args.forwards
    print(f"tiny Mixtral: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-2, "
          f"{input_ids.numel()} tokens/forward, {args.forwards} forwards/sample, median of {args.repeats} samples, "
          f"torch threads {torch.get_num_threads()}; {recorded} tokens recorded")
    print(f"{'setup':28s} {'ms/forward':>11s} {'tokens/s':>10s} {'vs bare':>8s}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:28s} {1000 * median / args.forwards:11.2f} {tokens / median:10.0f} {median / bare_median:8.3f}")


if __name__ == "__main__":
    main()
