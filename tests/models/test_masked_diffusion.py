"""Masked-diffusion TinyLM: the forward process, the ELBO terms, bidirectional attention,
the timestep reaching routers, and exact resume of a diffusion training run."""

from __future__ import annotations

import math

import pytest
import torch
from tests.lab_helpers import TINY_MODEL, small_corpus, tiny_train

from routelab.core.errors import ConfigError, InputError
from routelab.lab.train import train_run
from routelab.models.masked_diffusion import (
    MASK_EPS,
    generator_for,
    mask_tokens,
    masked_diffusion_forward,
    token_losses,
)
from routelab.models.tinylm import TinyLM, TinyLMConfig


def tiny(objective: str = "masked-diffusion", router: str = "mixtral", **kw) -> TinyLM:
    torch.manual_seed(0)
    config = TinyLMConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, top_k=2,
                          expert_d_hidden=16, router=router, objective=objective, **kw)
    return TinyLM(config).eval()


def test_mask_tokens_replaces_exactly_the_masked_positions():
    x0 = torch.randint(0, 50, (64, 200), generator=torch.Generator().manual_seed(1))
    xt, masked, p = mask_tokens(x0, 50, generator_for(3, 4))
    assert torch.equal(xt[masked], torch.full_like(xt[masked], 50))
    assert torch.equal(xt[~masked], x0[~masked])
    assert bool(((p >= MASK_EPS) & (p <= 1)).all())
    # each sequence masks about p_b of its 200 tokens (binomial: 5 std is ~0.18 at p=0.5)
    assert (masked.float().mean(1) - p).abs().max() < 0.18
    again = mask_tokens(x0, 50, generator_for(3, 4))
    assert torch.equal(again[1], masked) and torch.equal(again[2], p)


def test_token_losses_match_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    x0 = torch.tensor([[0, 2]])
    masked = torch.tensor([[True, False]])
    p = torch.tensor([0.25])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2)) / 0.25
    terms = token_losses(logits, x0, masked, p)
    assert terms[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert terms[0, 1].item() == 0.0


def test_diffusion_attention_is_bidirectional_and_causal_stays_causal():
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50
    for objective, sees_future in (("masked-diffusion", True), ("causal", False)):
        model = tiny(objective, router="hash")  # a router that mixes no tokens: only attention can
        with torch.no_grad():
            first = model(ids).logits[0, 0]
            second = model(changed).logits[0, 0]
        assert (not torch.allclose(first, second)) is sees_future, objective


def test_mask_token_is_an_input_only_for_diffusion_models():
    ids = torch.tensor([[1, 2, 50]])
    assert tiny("masked-diffusion")(ids).logits.shape == (1, 3, 50)  # never predicts the mask token
    with pytest.raises(InputError, match="vocab_size"):
        tiny("causal")(ids)
    with pytest.raises(ConfigError, match="objective"):
        TinyLMConfig(vocab_size=10, objective="autoregressive")
    with pytest.raises(ConfigError, match="masked-diffusion"):
        masked_diffusion_forward(tiny("causal"), ids[:, :2], generator_for(0))


def test_the_loss_is_the_mean_elbo_term_and_routers_get_the_mask_ratio():
    model = tiny("masked-diffusion", router="ec-dlm", router_options={"k_min": 1, "k_max": 3})
    seen = {}
    original = model.forward

    def spy(*args, **kwargs):
        seen["timestep"] = kwargs.get("timestep")
        return original(*args, **kwargs)

    model.forward = spy
    x0 = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    out, terms = masked_diffusion_forward(model, x0, generator_for(5))
    _, _, p = mask_tokens(x0, 50, generator_for(5))
    assert torch.equal(seen["timestep"], p)
    assert out.lm_loss.item() == pytest.approx(terms.mean().item())
    assert out.loss.item() == pytest.approx((out.lm_loss + out.aux_loss).item())


def test_diffusion_training_resumes_exactly(tmp_path):
    corpus = small_corpus(tmp_path)
    model = TINY_MODEL.model_copy(update={"objective": "masked-diffusion"})
    config = model.tinylm(vocab_size=corpus.vocab_size, max_seq_len=16, router="ec-dlm",
                          router_options={"k_min": 1, "k_max": 3})
    train = tiny_train(steps=4, checkpoint_every=2, eval_every=2)
    full = train_run(tmp_path / "full", corpus, config, train, show_progress=False)

    def stop_at_two(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "split", corpus, config, train, show_progress=False, on_step_end=stop_at_two)
    resumed = train_run(tmp_path / "split", corpus, config, train, show_progress=False, resume=True)
    assert resumed["final_eval"]["val_loss"] == full["final_eval"]["val_loss"]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(full["final_eval"]["val_loss"])
