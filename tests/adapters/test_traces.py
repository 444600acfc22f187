"""Adapter routing written to the routing-trace format and read back."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from routelab import Trace
from routelab.adapters import attach_adapters
from routelab.adapters.traces import record_adapter_trace


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.embed(ids)))


def test_token_level_adapter_routing_round_trips_through_a_trace(tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    adapters = attach_adapters(model, ["a", "b"], num_experts=4, rank=2, method="topk", router="mixtral")
    batches = [(torch.randint(0, 30, (2, 5)), torch.tensor([0, 1])), (torch.randint(0, 30, (1, 5)), torch.tensor([1]))]
    path = record_adapter_trace(adapters, tmp_path / "ad.trace", batches, task_names=["upper", "reverse"])
    trace = Trace.open(path)
    assert trace.num_tokens == 15 and trace.layers == (0, 1) and trace.num_experts == 4
    assert trace.metadata["level"] == "adapter" and trace.metadata["layer_names"] == ["a", "b"]
    with adapters.context(task_ids=batches[0][1]) as records:
        model(batches[0][0])
    assert np.array_equal(trace.topk_idx(1)[:10], records[1][1].topk_idx.numpy())
    tokens = trace.tokens()
    assert tokens.token_id[:10].tolist() == batches[0][0].reshape(-1).tolist()
    assert trace.domain_names == ["upper", "reverse"] and tokens.domain[:10].tolist() == [0] * 5 + [1] * 5


def test_task_level_routing_is_traced_as_head_skill_weights(tmp_path) -> None:
    model = TwoLinear()
    adapters = attach_adapters(model, ["a", "b"], num_experts=3, rank=2, method="mhr", num_tasks=2, num_heads=2)
    path = record_adapter_trace(adapters, tmp_path / "mhr.trace", [(torch.randint(0, 30, (2, 4)), torch.tensor([0, 1]))])
    layer = Trace.open(path).layer(0)
    assert layer.topk_idx.shape == (8, 6)
    assert np.allclose(layer.topk_weight.sum(axis=1), 1.0, atol=1e-5)
