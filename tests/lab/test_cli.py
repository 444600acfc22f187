"""CLI smoke tests of routelab train / compare / demo with tiny settings."""

from __future__ import annotations

import pytest
from tests.lab_helpers import write_corpus
from typer.testing import CliRunner

from routelab.cli import app

runner = CliRunner()
TINY_FLAGS = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--num-experts", "4", "--expert-d-hidden", "32",
              "--seq-len", "16", "--batch-size", "4", "--eval-every", "2", "--precision", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text"))


def corpus_flags(corpus_dir, tmp_path):
    return ["--corpus", str(corpus_dir), "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")]


def test_train_resume_and_errors(corpus_dir, tmp_path):
    out = tmp_path / "run"
    base = ["train", "--router", "loss-free", "--steps", "3", "--out", str(out), *TINY_FLAGS,
            *corpus_flags(corpus_dir, tmp_path)]
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "val loss" in result.output and (out / "model.pt").is_file()
    again = runner.invoke(app, base)
    assert again.exit_code == 2 and "--resume" in again.output
    assert runner.invoke(app, [*base, "--resume"]).exit_code == 0
    bad = runner.invoke(app, ["train", "--router", "mixtral", "-o", "aux_loss_coeff=0.1", *TINY_FLAGS,
                              *corpus_flags(corpus_dir, tmp_path)])
    assert bad.exit_code == 2 and "aux_loss_coef" in bad.output
    assert runner.invoke(app, ["train", "--router", "nope", *TINY_FLAGS]).exit_code == 2


def test_train_on_one_file_cut_into_documents(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("".join(f"Line {i}: the king speaks of the night and the crown.\n" for i in range(600)))
    args = ["train", "--router", "hash", "--steps", "2", "--out", str(tmp_path / "run"), *TINY_FLAGS,
            "--corpus", str(text), "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--chunk-bytes" in refused.output
    assert runner.invoke(app, [*args, "--chunk-bytes", "4096"]).exit_code == 0


def test_compare_with_file_and_flags(corpus_dir, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: cli\nrouters: [mixtral, {name: switch, options: {aux_loss_coef: 0.02}}]\nseeds: [0]\n"
        "model: {d_model: 32, n_layers: 2, n_heads: 2, num_experts: 4, top_k: 1, expert_d_hidden: 32}\n"
        "train: {steps: 2, batch_size: 4, seq_len: 16, eval_every: 1, eval_tokens: 128, precision: fp32}\n"
    )
    result = runner.invoke(app, ["compare", str(exp), "--out-dir", str(tmp_path / "runs"), "--no-progress",
                                 *corpus_flags(corpus_dir, tmp_path)])
    assert result.exit_code == 0, result.output
    assert "mixtral" in result.output and "switch" in result.output
    assert (tmp_path / "runs" / "cli" / "report.md").is_file()
    assert runner.invoke(app, ["compare"]).exit_code == 2  # neither a file nor --routers


def test_demo_smoke(tmp_path):
    result = runner.invoke(app, ["demo", "--routers", "mixtral,hash", "--steps", "2", "--out-dir", str(tmp_path / "runs"),
                                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "routelab demo leaderboard" in result.output and "wall time" in result.output
    assert (tmp_path / "runs" / "demo" / "report.md").is_file()
