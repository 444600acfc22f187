"""Every registered preset in a 2-layer toy model: forward + backward without NaN, then
``end_of_step``. One ``RoutingContext`` per forward is threaded through both MoE layers
(token ids for hash routers, a causal attention matrix for attention-aware routers, the
carry for layerwise recurrent routers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import routelab
from routelab.routers.families.recurrent import build_recurrent_routers
from tests.helpers import ALL_PRESETS, preset, valid_top_k

VOCAB, D_MODEL, NUM_EXPERTS = 50, 16, 6


class ToyModel(nn.Module):
    """embedding -> [x + MoE(x)] x 2 -> head, with one RoutingContext per forward."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def causal_attention(self, h: torch.Tensor) -> torch.Tensor:
        seq = h.shape[1]
        scores = h @ h.transpose(1, 2) / D_MODEL**0.5
        causal = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(token_ids)
        context = routelab.RoutingContext(token_ids=token_ids, padding_mask=padding_mask)
        aux = h.new_zeros(())
        for layer in self.layers:
            context.attention = self.causal_attention(h)
            out = layer(h, context=context)
            h = h + out.y
            aux = aux + out.aux_loss
        return self.head(h), aux


def make_model(name: str) -> ToyModel:
    info = preset(name)
    top_k = valid_top_k(info, NUM_EXPERTS, 2)
    activation = "relu" if name == "moe-x" else "swiglu"
    layers = [
        routelab.moe_layer(d_model=D_MODEL, d_hidden=24, num_experts=NUM_EXPERTS, top_k=top_k, router=name,
                           activation=activation)
        for _ in range(2)
    ]
    return ToyModel(layers)


def train_step(model: ToyModel, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    padding_mask = torch.ones(3, 10, dtype=torch.bool)
    padding_mask[2, 7:] = False
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    logits, aux = model(token_ids, padding_mask)
    target = torch.roll(token_ids, -1, dims=1)
    loss = nn.functional.cross_entropy(logits[padding_mask], target[padding_mask]) + aux
    optimizer.zero_grad()
    loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_trains_in_a_two_layer_toy_model(name: str) -> None:
    torch.manual_seed(0)
    model = make_model(name)
    for step in range(2):
        loss = train_step(model, seed=step)
        assert torch.isfinite(loss), f"{name}: loss {loss}"
        routelab.end_of_step(model)
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.randint(0, VOCAB, (2, 6)), torch.ones(2, 6, dtype=torch.bool))
    assert torch.isfinite(logits).all()


def test_recurrent_routers_share_state_across_the_toy_model() -> None:
    torch.manual_seed(0)
    routers = build_recurrent_routers(2, d_model=D_MODEL, num_experts=NUM_EXPERTS, rnn_hidden_size=8)
    model = ToyModel([routelab.MoE(d_model=D_MODEL, d_hidden=24, num_experts=NUM_EXPERTS, router=r) for r in routers])
    assert model.layers[0].router.scorer.cell is model.layers[1].router.scorer.cell
    assert torch.isfinite(train_step(model))
    cell = model.layers[0].router.scorer.cell
    model.zero_grad()
    logits, aux = model(torch.randint(0, VOCAB, (2, 5)), torch.ones(2, 5, dtype=torch.bool))
    (logits.square().mean() + aux).backward()
    # weight_hh only multiplies h_prev, which is 0 at the first layer: a gradient proves the state flowed.
    assert cell.weight_hh.grad is not None and float(cell.weight_hh.grad.abs().sum()) > 0


ZOO = ("top-p", "dynamoe", "rmoe", "similarity-aware", "attention-aware", "erc", "rexmoe", "condenser", "moe-x",
       "dynmole", "magnet", "promoe", "soft-moe")


def test_zoo_presets_are_listed_with_their_papers() -> None:
    from typer.testing import CliRunner

    from routelab.cli import app

    listed = {row["name"]: row for row in routelab.list_routers()}
    assert set(ZOO) <= set(listed)
    for name in ZOO:
        assert "arXiv" in listed[name]["paper"] or "2025" in listed[name]["paper"], name
        assert preset(name).builder.__doc__
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for name in ZOO:
        assert name in result.output
