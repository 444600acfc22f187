"""A `routelab train --expert-parallel` run folder stopped after a checkpoint and resumed
ends exactly where the uninterrupted run does (metrics and weights)."""

from __future__ import annotations

import json

import pytest
import torch

from routelab.lab.checkpoint import load_model
from routelab.lab.config import CorpusSettings, TrainConfig
from routelab.lab.data import prepare_corpus
from routelab.lab.parallel_train import train_expert_parallel
from routelab.models.tinylm import TinyLMConfig
from routelab.parallel.spawn import WorkerError, run_workers
from tests.lab_helpers import write_corpus


class Stop(Exception):
    """Stands in for a job killed after its step-3 checkpoint."""


def run(rank: int, world: int, folder: str, corpus, stop_at: int | None, resume: bool) -> None:  # noqa: ANN001
    config = TinyLMConfig(vocab_size=corpus.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                          num_experts=4, top_k=2, router="loss-free")
    train = TrainConfig(steps=5, batch_size=4, seq_len=16, eval_tokens=128, checkpoint_every=1, precision="fp32",
                        warmup_steps=2)

    def stop(step: int) -> None:
        if step == stop_at:
            raise Stop(f"stopped at step {step}")

    train_expert_parallel(folder, corpus, config, train, expert_parallel=world, resume=resume, show_progress=False,
                          on_step_end=stop)


@pytest.mark.slow
def test_resumed_ep_run_equals_uninterrupted_run(tmp_path) -> None:
    settings = CorpusSettings(source=str(write_corpus(tmp_path / "text")), vocab_size=300)
    corpus = prepare_corpus(settings.options(), cache_dir=tmp_path / "cache")
    run_workers(run, 2, str(tmp_path / "straight"), corpus, None, False, timeout_s=300)
    with pytest.raises(WorkerError, match="stopped at step 3"):
        run_workers(run, 2, str(tmp_path / "resumed"), corpus, 3, False, timeout_s=300)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    run_workers(run, 2, str(tmp_path / "resumed"), corpus, None, True, timeout_s=300)

    def rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(("time_s", "per_s"))} for line in lines]

    assert rows("resumed") == rows("straight")
    straight, _, _ = load_model(tmp_path / "straight" / "model.pt")
    resumed, _, _ = load_model(tmp_path / "resumed" / "model.pt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
