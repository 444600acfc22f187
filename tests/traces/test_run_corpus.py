"""`routelab trace CHECKPOINT` without --corpus records the validation split its run trained on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tests.lab_helpers import TINY_MODEL, small_corpus, tiny_train
from typer.testing import CliRunner

from routelab.cli import app
from routelab.lab.run_corpus import split_sequences
from routelab.lab.train import train_run
from routelab.traces import Trace

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    corpus = small_corpus(root)
    config = TINY_MODEL.tinylm(vocab_size=corpus.vocab_size, max_seq_len=16, router="mixtral", router_options={})
    train_run(root / "run", corpus, config, tiny_train(steps=2, eval_every=2, checkpoint_every=2), show_progress=False)
    return root, corpus


def test_split_sequences_cover_the_split_in_order_without_crossing_domains(trained_run):
    _, corpus = trained_run
    pieces = list(split_sequences(corpus, "val", 7))
    assert np.concatenate([ids for _, ids in pieces]).tolist() == np.asarray(corpus.tokens("val")).tolist()
    labels = np.asarray(corpus.domain_labels("val"))
    start = 0
    for domain, ids in pieces:
        assert 1 <= len(ids) <= 7
        assert {corpus.domains[i] for i in labels[start : start + len(ids)]} == {domain}
        start += len(ids)


def test_trace_defaults_to_the_runs_validation_split(trained_run, tmp_path):
    root, corpus = trained_run
    out = tmp_path / "val.trace"
    args = ["trace", str(root / "run" / "model.pt"), "--out", str(out), "--cache-dir", str(root / "cache"),
            "--seq-len", "16", "--batch-size", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    trace = Trace.open(out)
    assert trace.domain_names == corpus.domains
    assert trace.metadata["corpus"][0]["content_hash"] == corpus.content_hash
    table = trace.tokens()
    np.testing.assert_array_equal(table.token_id, np.asarray(corpus.tokens("val")))
    np.testing.assert_array_equal(table.domain, np.asarray(corpus.domain_labels("val")))
    assert trace.num_layers == TINY_MODEL.n_layers and trace.k_max == TINY_MODEL.top_k


def test_trace_of_a_checkpoint_outside_a_run_folder_asks_for_corpus(trained_run, tmp_path):
    root, _ = trained_run
    lone = tmp_path / "model.pt"
    shutil.copy(root / "run" / "model.pt", lone)
    result = runner.invoke(app, ["trace", str(lone), "--out", str(tmp_path / "t.trace")])
    assert result.exit_code == 2
    assert "--corpus" in result.output and "config.json" in result.output


def test_trace_refuses_a_corpus_that_changed_since_training(trained_run, tmp_path):
    root, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["corpus"]["content_hash"] = "0" * 64
    (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["trace", str(run / "model.pt"), "--out", str(tmp_path / "t.trace"),
                                 "--cache-dir", str(root / "cache")])
    assert result.exit_code == 2
    assert "changed since training" in result.output
