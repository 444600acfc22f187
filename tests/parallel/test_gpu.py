"""The NCCL path on a GPU: one rank per GPU (world size 1 on a one-GPU machine), fp32,
against the single-process layer on the same GPU. Skipped where there is no CUDA GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from routelab.parallel.spawn import run_workers
from tests.parallel.gpu_cases import nccl_layer_matches_single_process

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs a CUDA GPU and NCCL"
)


def test_nccl_expert_parallel_layer_matches_single_process() -> None:
    world = min(torch.cuda.device_count(), 4)
    for result in run_workers(nccl_layer_matches_single_process, world, backend="nccl", timeout_s=300):
        assert result["y"] < 1e-4 and result["x_grad"] < 1e-4 and result["expert_grad"] < 1e-4, result
