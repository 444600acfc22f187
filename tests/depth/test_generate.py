"""KV-cache decoding through depth-routed TinyLMs equals the full forward pass."""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.depth.generate import generate
from routelab.models.tinylm import TinyLM, TinyLMConfig

CASES = [
    (None, {}, "dense"),
    ("mod", {"capacity": 0.5, "every": 1, "eval_mode": "causal-aux"}, "dense"),
    ("mod", {"capacity": 0.5, "every": 1, "eval_mode": "causal-mlp"}, "dense"),
    ("gamma-mod", {"every": 1, "prefill_threshold": 0.5}, "dense"),
    ("duo", {}, "dense"),
    ("lff", {}, "dense"),
    ("halting", {"threshold": 0.5}, "moe"),
]


def tiny(depth, options, ffn) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, ffn=ffn,
                                num_experts=4, top_k=2, depth_router=depth, depth_options=options)).eval()
    if depth == "mod":
        for predictor in model.depth.predictors.values():  # a mix of executed and skipped tokens
            predictor.net[-1].bias.data.fill_(0.0)
    return model


@pytest.mark.parametrize(("depth", "options", "ffn"), CASES)
def test_cached_decoding_equals_the_full_forward(depth, options, ffn) -> None:
    model = tiny(depth, options, ffn)
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 6)
    assert out.ids.shape == (2, 11) and torch.equal(out.ids[:, :5], prompt)
    assert torch.allclose(model(out.ids).logits[:, :-1], out.logits, atol=1e-5)
    if depth == "mod":  # a skipped token writes no K/V in that block
        assert sum(out.cached_tokens[0].values()) < 10 * 3


def test_drllm_decodes_with_prefill_decisions_and_a_second_cache_for_repeats() -> None:
    model = tiny("drllm", {}, "dense")
    for router in model.depth.routers:  # force: skip layer 0, repeat layer 1, execute layer 2
        router.net[-1].bias.data = torch.tensor([0.0, 0.0, 0.0])
    model.depth.routers[0].net[-1].bias.data[0] = 50.0
    model.depth.routers[1].net[-1].bias.data[2] = 50.0
    model.depth.routers[2].net[-1].bias.data[1] = 50.0
    prompt = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, 4)
    assert out.cached_tokens[0] == {(1, 0): 8, (1, 1): 8, (2, 0): 8}
    model.depth.set_decisions(torch.tensor([[0, 2, 1]]))
    with model.depth.use_mode("given"):
        assert torch.allclose(model(out.ids).logits[:, :-1], out.logits, atol=1e-5)


def test_training_time_only_modes_refuse_to_decode() -> None:
    model = tiny("mod", {"eval_mode": "topk"}, "dense")
    with pytest.raises(ConfigError, match="training-time only"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
