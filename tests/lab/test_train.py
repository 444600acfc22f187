"""Training runs: exact resume after a kill, checkpoints, metrics, the LR schedule and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.lab_helpers import TINY_MODEL, small_corpus, tiny_train

from routelab.core.errors import ConfigError, InputError
from routelab.lab.batches import TrainSampler
from routelab.lab.checkpoint import atomic_save, load_model, read_checkpoint
from routelab.lab.train import WarmupCosine, read_metrics, train_run


class Killed(Exception):
    """Stands in for the process being killed after some step."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def model_config(corpus, router: str):
    return TINY_MODEL.tinylm(vocab_size=corpus.vocab_size, max_seq_len=16, router=router, router_options={})


def without_timing(rows):
    drop = {"step_time_s", "tokens_per_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.parametrize("router", ["loss-free", "noisy-topk"])  # stateful bias; RNG noise in the router
def test_resume_after_kill_equals_uninterrupted_run(corpus, tmp_path, router):
    config = model_config(corpus, router)
    train = tiny_train(steps=10, checkpoint_every=4, eval_every=3, keep_checkpoint=True)
    train_run(tmp_path / "full", corpus, config, train, show_progress=False)

    def kill_at_6(step):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_run(tmp_path / "cut", corpus, config, train, show_progress=False, on_step_end=kill_at_6)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    assert max(r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 6
    train_run(tmp_path / "cut", corpus, config, train, show_progress=False, resume=True)

    full = read_checkpoint(tmp_path / "full" / "model.pt")["model"]
    resumed = read_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    full_opt = read_checkpoint(tmp_path / "full" / "checkpoint.pt")["optimizer"]["state"]
    resumed_opt = read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["optimizer"]["state"]
    assert all(torch.equal(full_opt[i]["exp_avg"], resumed_opt[i]["exp_avg"]) for i in full_opt)
    # the metrics log has no duplicate or lost steps and equals the uninterrupted one
    assert without_timing(read_metrics(tmp_path / "full" / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "cut" / "metrics.jsonl")
    )
    full_probe = np.load(tmp_path / "full" / "probe_routing.npz")
    cut_probe = np.load(tmp_path / "cut" / "probe_routing.npz")
    assert np.array_equal(full_probe["topk_idx"], cut_probe["topk_idx"])
    assert list(full_probe["steps"]) == [3, 6, 9, 10]


def test_ctrl_c_checkpoints_at_the_next_step_boundary(corpus, tmp_path):
    import os
    import signal

    config = model_config(corpus, "mixtral")
    train = tiny_train(steps=6, checkpoint_every=100)

    def press_ctrl_c(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "cut", corpus, config, train, show_progress=False, on_step_end=press_ctrl_c)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 3  # the step in flight finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    train_run(tmp_path / "cut", corpus, config, train, show_progress=False, resume=True)
    train_run(tmp_path / "full", corpus, config, train, show_progress=False)
    full = read_checkpoint(tmp_path / "full" / "model.pt")["model"]
    resumed = read_checkpoint(tmp_path / "cut" / "model.pt")["model"]
    assert all(torch.equal(full[name], resumed[name]) for name in full)


def test_run_outputs_and_load_model(corpus, tmp_path):
    config = model_config(corpus, "mixtral")
    summary = train_run(tmp_path / "run", corpus, config, tiny_train(), show_progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "model.pt", "probe_routing.npz", "summary.json"} <= files
    assert "checkpoint.pt" not in files  # removed at the end unless keep_checkpoint
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 9)) and [r["step"] for r in eval_rows] == [4, 8]
    assert train_rows[-1]["tokens"] == 8 * 4 * 16 and len(train_rows[0]["max_vio"]) == 2
    assert eval_rows[0]["routing_fluctuation"] is None and 0 <= eval_rows[1]["routing_fluctuation"] <= 1
    assert summary["final_eval"] == eval_rows[-1]
    assert set(eval_rows[-1]["val_loss_by_domain"]) == {"code", "prose"}

    model, tokenizer, meta = load_model(tmp_path / "run")
    assert meta["router"] == "mixtral" and meta["step"] == 8 and not model.training
    assert tokenizer.encode("the king") == corpus.tokenizer.encode("the king")
    # the loaded model reproduces the final validation loss of the run
    from routelab.lab.batches import eval_batches, probe_batch
    from routelab.lab.evaluation import evaluate

    val = eval_batches(corpus.tokens("val"), corpus.domain_labels("val"), 16, 4, 256)
    probe = probe_batch(corpus.tokens("val"), corpus.domain_labels("val"), 16, 2)
    metrics, probe_idx, _ = evaluate(model, val, probe, corpus.domains, "fp32")
    assert metrics["val_loss"] == pytest.approx(eval_rows[-1]["val_loss"], rel=1e-6)
    saved = np.load(tmp_path / "run" / "probe_routing.npz")
    assert np.array_equal(saved["topk_idx"][-1, 0], probe_idx[0].numpy())


def test_finished_run_is_returned_and_settings_are_checked(corpus, tmp_path):
    config = model_config(corpus, "mixtral")
    first = train_run(tmp_path / "run", corpus, config, tiny_train(steps=4), show_progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train_run(tmp_path / "run", corpus, config, tiny_train(steps=4), show_progress=False)
    assert train_run(tmp_path / "run", corpus, config, tiny_train(steps=4), show_progress=False, resume=True) == first
    with pytest.raises(ConfigError, match="train_config.lr"):
        train_run(tmp_path / "run", corpus, config, tiny_train(steps=4, lr=1e-2), show_progress=False, resume=True)


def test_gradient_accumulation_and_bf16(corpus, tmp_path):
    config = model_config(corpus, "loss-free")
    summary = train_run(tmp_path / "run", corpus, config, tiny_train(steps=4, grad_accum=2, precision="bf16"),
                        show_progress=False)
    assert summary["train_tokens"] == 4 * 2 * 4 * 16 and summary["precision"] == "bf16"
    bias = load_model(tmp_path / "run")[0].blocks[0].ffn.router.balancer.bias
    assert bias.abs().sum() > 0  # end_of_step ran: the loss-free bias moved


def test_sampler_is_a_function_of_seed_and_step(corpus):
    tokens, labels = corpus.tokens("train"), corpus.domain_labels("train")
    a = TrainSampler(tokens, labels, 16, 4, seed=3)
    b = TrainSampler(tokens, labels, 16, 4, seed=3)
    for step in (5, 1, 9):  # any order
        assert torch.equal(a.batch(step).inputs, b.batch(step).inputs)
    batch = a.batch(2)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert not torch.equal(a.batch(2).inputs, a.batch(3).inputs)
    assert not torch.equal(a.batch(2).inputs, TrainSampler(tokens, labels, 16, 4, seed=4).batch(2).inputs)


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [schedule(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)


def test_atomic_save_and_bad_files(tmp_path):
    atomic_save({"format": "x"}, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind
    with pytest.raises(InputError, match="not a routelab TinyLM checkpoint"):
        read_checkpoint(tmp_path / "a.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="is not a routelab checkpoint"):
        read_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nothing.pt")


def test_vocab_mismatch_is_refused(corpus, tmp_path):
    config = TINY_MODEL.tinylm(vocab_size=corpus.vocab_size + 1, max_seq_len=16, router="mixtral", router_options={})
    with pytest.raises(ConfigError, match="vocab_size"):
        train_run(tmp_path / "run", corpus, config, tiny_train(), show_progress=False)
    assert json.dumps(tiny_train().model_dump())  # the config serialises


def test_auto_precision_is_bf16_only_with_amx_tiles(monkeypatch):
    from routelab.lab import train

    monkeypatch.setattr(train, "cpu_has_amx_bf16", lambda: True)
    assert train.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(train, "cpu_has_amx_bf16", lambda: False)  # e.g. AVX512-BF16 alone
    assert train.resolve_precision("auto") == "fp32"
    assert train.resolve_precision("bf16") == "bf16" and train.resolve_precision("fp32") == "fp32"
