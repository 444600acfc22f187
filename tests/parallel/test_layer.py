"""The expert-parallel MoE layer equals the single-process layer on the concatenated batch.

2 and 4 gloo processes (one process group per spawned run); oracle and tolerances in
``tests/parallel/layer_cases.py``.
"""

from __future__ import annotations

import pytest

from routelab.parallel.spawn import run_workers
from tests.parallel.layer_cases import compare_layer

CASES = [
    {"name": "mixtral", "router": "mixtral", "seq": 2, "seq_len": 8},
    {"name": "mixtral-padded", "router": "mixtral", "seq": 2, "seq_len": 8, "padded": True},
    {"name": "deepseek-v3 (loss-free bias, 4 steps)", "router": "deepseek-v3", "seq": 2, "seq_len": 8, "steps": 4},
    {"name": "expert-choice", "router": "expert-choice", "seq": 2, "seq_len": 8},
    {"name": "sinkhorn", "router": "sinkhorn", "seq": 2, "seq_len": 8},
    {"name": "capacity-drop", "router": "mixtral", "seq": 2, "seq_len": 8, "options": {"capacity_factor": 0.5}},
    {"name": "kmeans (stateful scorer, 3 steps)", "router": "kmeans", "seq": 2, "seq_len": 8, "steps": 3},
    {"name": "similarity-aware (gathers tokens)", "router": "similarity-aware", "seq": 2, "seq_len": 8},
    {"name": "skewed, a rank receives no tokens", "router": "mixtral", "seq": 2, "seq_len": 8, "skew": 3.0},
    {"name": "llep-skewed", "router": "mixtral", "seq": 2, "seq_len": 8, "llep": True, "skew": 3.0},
]
TOLERANCE = 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_equals_single_process(world: int) -> None:
    per_rank = run_workers(compare_layer, world, CASES, timeout_s=180)
    for rank, results in enumerate(per_rank):
        for case, result in zip(CASES, results):
            for key in ("y", "x_grad", "param_grad", "aux", "bias", "stats"):
                assert result[key] <= TOLERANCE, (world, rank, case["name"], key, result[key])
    by_name = dict(zip((c["name"] for c in CASES), per_rank[0]))
    assert by_name["deepseek-v3 (loss-free bias, 4 steps)"]["buffers_nonzero"]  # the bias did move
    assert by_name["capacity-drop"]["dropped"]  # capacity did drop assignments
    assert by_name["llep-skewed"]["llep_used"]  # LLEP did move hot-expert tokens to other ranks
    assert 0 in by_name["skewed, a rank receives no tokens"]["rank_rows"]
