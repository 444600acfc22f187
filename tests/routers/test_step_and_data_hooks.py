"""The router hooks of a training loop: ``register_end_of_step`` (stateful routers updated by
the optimizer step), the warning when ``end_of_step`` is forgotten, and ``fit_to_data``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tests.lab_helpers import TINY_MODEL, small_corpus, tiny_train

import routelab
from routelab.lab.checkpoint import load_model
from routelab.lab.train import train_run


def loss_free_layers(seed: int) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    return torch.nn.ModuleList(routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router=name)
                               for name in ("loss-free", "mixtral", "deepseek-v3"))


def train_steps(model: torch.nn.ModuleList, steps: int, manual: bool) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if not manual:
        routelab.register_end_of_step(optimizer, model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 6, 8, generator=g)
        loss = sum(layer(x).y.square().mean() for layer in model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if manual:
            routelab.end_of_step(model)
    return optimizer


def test_the_optimizer_hook_updates_as_calling_end_of_step_by_hand() -> None:
    by_hand, hooked = loss_free_layers(0), loss_free_layers(0)
    train_steps(by_hand, 3, manual=True)
    train_steps(hooked, 3, manual=False)
    for a, b in zip(by_hand, hooked):
        torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert int(hooked[0].router.balancer.num_updates) == 3 and int(hooked[2].router.balancer.num_updates) == 3
    assert bool(hooked[0].router.balancer.bias.ne(0).any())  # the bias moved


def test_hook_handle_removes_it() -> None:
    model = loss_free_layers(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    routelab.register_end_of_step(optimizer, model).remove()
    model[0](torch.randn(1, 6, 8)).y.sum().backward()
    optimizer.step()
    assert int(model[0].router.balancer.num_updates) == 0


def test_a_stateful_router_warns_once_when_end_of_step_is_forgotten() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="loss-free")
    limit = layer.router.forgotten_step_forwards
    x = torch.randn(1, 4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(limit):
            layer(x)
        assert not caught  # gradient accumulation over up to `limit` micro-batches is fine
        routelab.end_of_step(layer)
        for _ in range(limit):
            layer(x)
        assert not caught  # end_of_step restarted the count
        for _ in range(3 * limit):
            layer(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "loss-free" in messages[0] and "LossFreeBias" in messages[0]
    assert "register_end_of_step" in messages[0]


@pytest.mark.parametrize("router, mode", [("mixtral", "train"), ("loss-free", "eval")])
def test_stateless_routers_and_evaluation_never_warn(router: str, mode: str) -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router=router)
    layer.train(mode == "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3 * layer.router.forgotten_step_forwards):
            layer(torch.randn(1, 4, 8))


def test_fit_to_data_fits_balanced_hash_routers_to_the_token_counts() -> None:
    vocab = 50
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 40), generator=g) ** 2 % vocab  # skewed counts
    model = torch.nn.ModuleList([
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="hash", hash_mode="balanced", vocab_size=vocab),
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="hash"),  # random hashing learns nothing
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="mixtral"),
    ])
    expected = routelab.create_router("hash", d_model=8, num_experts=4, hash_mode="balanced", vocab_size=vocab)
    expected.selector.fit(torch.bincount(ids.reshape(-1), minlength=vocab))
    assert routelab.fit_to_data(model, ids, vocab) == 2  # both hash selectors are FitsData parts
    assert torch.equal(model[0].router.selector.table, expected.selector.table)
    assert model[1].router.selector.table is None
    assert routelab.fit_to_data(torch.nn.Linear(2, 2), ids, vocab) == 0


def test_the_lab_fits_balanced_hash_tables_to_its_training_split(tmp_path) -> None:
    corpus = small_corpus(tmp_path / "corpus")
    options = {"hash_mode": "balanced", "vocab_size": corpus.vocab_size}
    config = TINY_MODEL.tinylm(vocab_size=corpus.vocab_size, max_seq_len=16, router="hash", router_options=options)
    train_run(tmp_path / "run", corpus, config, tiny_train(steps=1, eval_every=1), show_progress=False)
    model, _, _ = load_model(tmp_path / "run")
    counts = torch.from_numpy(np.bincount(np.asarray(corpus.tokens("train")), minlength=corpus.vocab_size))
    expected = routelab.create_router("hash", d_model=32, num_experts=4, top_k=2, **options)
    expected.selector.fit(counts)
    tables = [m.table for m in model.modules() if getattr(m, "table", None) is not None]
    assert len(tables) == 2 and all(torch.equal(t, expected.selector.table) for t in tables)
