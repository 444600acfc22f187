"""Replay speed of expert caches and the SRP/SCH metrics on a synthetic trace (docs/benchmarks.md).

Builds a 1M-token, 16-layer, 64-expert, top-8 routing trace in memory (512-token sequences;
each sequence prefers a few experts, so caches and windows see realistic locality), then
times in one run:

- LRU, LFU and Belady replay (``stack_replay``: every cache size in one pass) in expert
  look-ups per second, against the pure-Python kernel on a slice of the same trace;
- SRP for W in {4,16,64,256} and SCH for L in {4,16,64,256} with the LRU/LFU/Belady
  baselines over all 16 layers, with moe-lrc's every-16th-sequence replay and on all
  sequences.

Usage: python bench/trace_replay.py [--tokens 1000000] [--layers 16] [--experts 64] [--k 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from routelab.metrics.locality import SEG_LENGTHS, segment_cache_hit_rates, segment_routing_performance
from routelab.metrics.native import load_kernels
from routelab.metrics.replay import stack_replay
from routelab.traces import InMemoryTrace


def synthetic_layer(rng: np.random.Generator, tokens: int, experts: int, k: int, seq_len: int) -> np.ndarray:
    """Top-k of Gumbel-perturbed logits: a Zipf-like global popularity plus a per-sequence preference."""
    popularity = -0.8 * np.log(np.arange(1, experts + 1, dtype=np.float32))
    rng.shuffle(popularity)
    out = np.empty((tokens, k), dtype=np.int16)
    for start in range(0, tokens, 1 << 16):
        n = min(1 << 16, tokens - start)
        seq = (start + np.arange(n)) // seq_len
        prefer = np.random.default_rng(seq[0] * 7919 + 17)
        bias = prefer.normal(0, 1.5, size=(seq[-1] - seq[0] + 1, experts)).astype(np.float32)
        logits = popularity + bias[seq - seq[0]] + rng.gumbel(size=(n, experts)).astype(np.float32)
        out[start : start + n] = np.argpartition(-logits, k, axis=1)[:, :k]
    return out


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reference-tokens", type=int, default=4096, help="Tokens replayed by the pure-Python kernel.")
    args = parser.parse_args()
    if load_kernels() is None:
        print("warning: the C kernels did not build; timing the pure-Python fallback")
    rng = np.random.default_rng(0)
    (layers, gen_s) = timed(lambda: [synthetic_layer(rng, args.tokens, args.experts, args.k, args.seq_len)
                                     for _ in range(args.layers)])
    seq_id = np.arange(args.tokens) // args.seq_len
    trace = InMemoryTrace.from_arrays(layers, args.experts, seq_id=seq_id)
    del layers
    offsets = trace.sequence_offsets()
    lookups = args.tokens * args.k
    print(f"trace: {args.tokens} tokens x {args.layers} layers, E={args.experts}, k={args.k}, "
          f"{len(offsets) - 1} sequences (generated in {gen_s:.1f} s)")

    ids0 = trace.topk_idx(0)
    ref_n = min(args.reference_tokens, args.tokens)
    print("\nreplay of one layer, every cache size in one pass (caches restart per sequence):")
    print(f"{'policy':8s} {'look-ups/s':>12s} {'pure Python look-ups/s':>24s} {'ratio':>7s}")
    for policy in ("lru", "lfu", "belady"):
        seconds = []
        for layer in trace.layers[:4]:
            ids = trace.topk_idx(layer)
            _, s = timed(lambda: stack_replay(ids, args.experts, policy, seg_offsets=offsets))
            seconds.append(s)
        fast = lookups / np.median(seconds)
        ref_offsets = offsets[offsets <= ref_n]
        ref_offsets = np.append(ref_offsets, ref_n) if ref_offsets[-1] != ref_n else ref_offsets
        _, ref_s = timed(
            lambda: stack_replay(ids0[:ref_n], args.experts, policy, seg_offsets=ref_offsets, native=False)
        )
        slow = ref_n * args.k / ref_s
        print(f"{policy:8s} {fast / 1e6:10.1f} M {slow / 1e6:22.3f} M {fast / slow:7.0f}x")

    print("\nSRP (W = 4,16,64,256) and SCH (L = 4,16,64,256) + LRU/LFU/Belady curves, all layers:")
    _, srp_s = timed(lambda: segment_routing_performance(trace, windows=SEG_LENGTHS, level="layer"))
    _, srp_model_s = timed(lambda: segment_routing_performance(trace, windows=SEG_LENGTHS, level="model"))
    _, sch16_s = timed(lambda: segment_cache_hit_rates(trace, future_lens=SEG_LENGTHS, sequence_stride=16))
    _, sch1_s = timed(lambda: segment_cache_hit_rates(trace, future_lens=SEG_LENGTHS, sequence_stride=1,
                                                      baselines=()))
    print(f"SRP per layer, 4 windows:                         {srp_s:6.1f} s")
    print(f"SRP model level, 4 windows:                       {srp_model_s:6.1f} s")
    print(f"SCH 4 L + 3 baselines, every 16th sequence:       {sch16_s:6.1f} s")
    print(f"SCH 4 L, all sequences:                           {sch1_s:6.1f} s")
    print(f"SRP + SCH (moe-lrc defaults):                     {srp_s + sch16_s:6.1f} s")
    print(f"SRP + SCH (all sequences):                        {srp_s + sch1_s:6.1f} s")


if __name__ == "__main__":
    main()
