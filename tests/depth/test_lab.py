"""The lab with depth routers: CLI flags, second stages, FLOPs and loss at equal FLOPs (smoke budget)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from tests.lab_helpers import write_corpus
from typer.testing import CliRunner

from routelab.cli import app
from routelab.core.errors import ConfigError
from routelab.lab.experiment import load_experiment, run_experiment
from routelab.lab.train import read_metrics

runner = CliRunner()
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "expert_d_hidden": 32},
    "depth": {"fit": {"fit_batches": 1, "report_batches": 1, "drllm_simulations": 4}},
    "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "eval_every": 2, "eval_tokens": 128,
              "probe_sequences": 2, "checkpoint_every": 4, "precision": "fp32"},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("depth-compare")
    source = write_corpus(tmp_path / "text", files_per_domain=4, size=2000)
    config = load_experiment({
        "name": "depth",
        "out_dir": str(tmp_path / "runs"),
        "routers": [
            "dense",
            "mixtral",
            {"name": "dense", "label": "mod-25", "depth_router": "mod", "depth_options": {"capacity": 0.25, "every": 1}},
            {"name": "dense", "label": "duo", "depth_router": "duo"},
            {"name": "dense", "label": "drllm", "depth_router": "drllm", "depth_options": {"hidden": 16}},
        ],
        "corpus": {"source": str(source), "max_bytes_per_domain": None, "val_fraction": 0.25, "vocab_size": 300},
        **TINY,
    })
    result = run_experiment(config, console=Console(quiet=True), show_progress=False, cache_dir=tmp_path / "cache")
    return config, result


def test_compare_reports_flops_and_loss_at_equal_flops(finished):
    config, result = finished
    rows = {r["router"]: r for r in result["rows"]}
    assert rows["mod-25"]["mflops_per_token"] < rows["dense"]["mflops_per_token"]
    budget = min(r["train_pflops"] for r in rows.values())
    cheapest = min(rows, key=lambda k: rows[k]["train_pflops"])
    assert rows[cheapest]["train_pflops"] == budget
    assert rows[cheapest]["loss_at_equal_flops"] == pytest.approx(rows[cheapest]["val_loss"])
    assert all(r["loss_at_equal_flops"] is not None for r in rows.values())
    report = result["report"].read_text()
    assert "Quality vs compute" in report and "duo:oracle" in report and "drllm:mcts" in report
    assert (config.folder / "quality_vs_compute.png").is_file()


def test_depth_runs_record_modes_rates_and_second_stages(finished):
    config, _ = finished
    final = [r for r in read_metrics(config.folder / "duo-seed0" / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert set(final["depth_modes"]) == {"random", "router", "big", "small", "skip", "oracle"}
    oracle = final["depth_modes"]["oracle"]
    assert oracle["val_loss"] <= final["depth_modes"]["small"]["val_loss"] + 1e-6  # all-small is a searched path
    assert len(final["depth_fit"]["router_accuracy"]) == 2
    assert set(final["depth_rates"]["0"]) == {"skip", "small", "big"}
    mod = [r for r in read_metrics(config.folder / "mod-25-seed0" / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert mod["depth_modes"]["topk"]["rates"]["0"]["execute"] == pytest.approx(0.25)
    assert mod["depth_modes"]["causal-aux"]["causal"] and not mod["depth_modes"]["topk"]["causal"]
    summary = json.loads((config.folder / "drllm-seed0" / "summary.json").read_text())
    assert summary["depth_router"] == "drllm"


def test_train_cli_depth_flags_and_errors(tmp_path):
    source = write_corpus(tmp_path / "text", files_per_domain=4, size=2000)
    flags = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
             "--eval-every", "2", "--eval-tokens", "128", "--precision", "fp32", "--no-progress", "--corpus", str(source),
             "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--router", "dense", "--depth-router", "mod", "--depth-capacity", "0.125",
                                 "--steps", "2", "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    assert "MFLOPs/token" in result.output and "causal-mlp" in result.output
    trace = tmp_path / "val.trace"
    traced = runner.invoke(app, ["trace", str(out / "model.pt"), "--out", str(trace), "--cache-dir",
                                 str(tmp_path / "cache")])
    assert traced.exit_code == 0, traced.output
    assert "depth-routed" in traced.output
    analysed = runner.invoke(app, ["analyze", str(trace), "--no-prefetch"])
    assert analysed.exit_code == 0, analysed.output
    report = (tmp_path / "val.trace-analysis" / "report.md").read_text()
    assert "## Depth decisions" in report and "compute per token" in report.lower()
    data = json.loads((tmp_path / "val.trace-analysis" / "analysis.json").read_text())
    assert set(data["depth"]["rates"]) == {"1"}  # every other block: only layer 1 of 2 is routed
    arank = runner.invoke(app, ["depth", "arank", str(out / "model.pt"), "--layers", "1", "--seq-len", "16",
                                "--cache-dir", str(tmp_path / "cache")])
    assert arank.exit_code == 0, arank.output
    assert "--depth-option layers=[" in arank.output
    listed = runner.invoke(app, ["depth", "list"])
    assert listed.exit_code == 0 and "training-time only" in listed.output and "drllm" in listed.output
    bad = runner.invoke(app, ["train", "--router", "dense", "--depth-router", "mdo", "--steps", "2", *flags])
    assert bad.exit_code == 2 and "Did you mean 'mod'" in bad.output
    moe = runner.invoke(app, ["train", "--router", "mixtral", "--depth-router", "duo", "--steps", "2", *flags])
    assert moe.exit_code == 2 and "dense" in moe.output
    orphan = runner.invoke(app, ["train", "--depth-capacity", "0.5", "--steps", "2", *flags])
    assert orphan.exit_code == 2 and "--depth-router" in orphan.output


def test_experiment_refuses_bad_depth_options(tmp_path):
    with pytest.raises(ConfigError, match="capacity must be in"):
        load_experiment({"routers": [{"name": "dense", "depth_router": "mod", "depth_options": {"capacity": 2}}]})


def test_compute_per_token_and_option_rates():
    from routelab.metrics.depth import compute_per_token, option_rates

    choices = [[0, 1, 2, 1], [2, 2, 0, 1]]  # two layers, four tokens; options skip / small / big
    costs = [0.0, 0.25, 1.0]
    assert compute_per_token(choices, costs).tolist() == [0.5, 0.625, 0.5, 0.25]
    assert option_rates([0, 1, 1, -1], 3).tolist() == [1 / 3, 2 / 3, 0.0]
