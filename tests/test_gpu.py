"""GPU paths: run only where CUDA is present (CI has none, so these skip there)."""

from __future__ import annotations

import pytest
import torch

import routelab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3", "expert-choice", "loss-free"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_cpu(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cpu = routelab.MoE(d_model=64, d_hidden=128, num_experts=8, top_k=2, router=name)
    gpu = routelab.MoE(d_model=64, d_hidden=128, num_experts=8, top_k=2, router=name).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 32, 64)
    out_cpu = cpu.to(dtype)(x.to(dtype))
    out_gpu = gpu.to(dtype)(x.to(dtype).cuda())
    assert torch.equal(out_cpu.routing.topk_idx, out_gpu.routing.topk_idx.cpu())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out_gpu.y.float().cpu(), out_cpu.y.float(), atol=tol, rtol=tol)
    (out_gpu.y.float().square().mean() + out_gpu.aux_loss).backward()
    assert torch.isfinite(gpu.experts.w_in_EDH.grad).all()
