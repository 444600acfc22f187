"""routelab compare: runs every router x seed, and its report's numbers come from the runs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from tests.lab_helpers import write_corpus
from rich.console import Console

from routelab.core.errors import ConfigError
from routelab.lab.experiment import load_experiment, run_experiment
from routelab.lab.run_metrics import RUN_METRICS, RunRecord, register_run_metric, run_columns
from routelab.lab.equivalence import tost
from routelab.lab.train import read_metrics

TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "expert_d_hidden": 32},
    "train": {"steps": 6, "batch_size": 4, "seq_len": 16, "warmup_steps": 2, "eval_every": 2, "eval_tokens": 256,
              "probe_sequences": 2, "checkpoint_every": 3, "precision": "fp32"},
}


def settings(tmp_path, **extra):
    source = write_corpus(tmp_path / "text")
    data = {
        "name": "tiny",
        "out_dir": str(tmp_path / "runs"),
        "routers": ["mixtral", "hash", "dense"],
        "seeds": [0, 1],
        "corpus": {"source": str(source), "max_bytes_per_domain": None, "val_fraction": 0.25, "vocab_size": 300},
        "tost": {"margin": 0.5},
        **TINY,
    }
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    config = load_experiment(settings(tmp_path))
    result = run_experiment(config, console=Console(quiet=True), show_progress=False, cache_dir=tmp_path / "cache")
    return config, result


def last_eval(folder):
    return [r for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "eval"][-1]


def test_outputs_exist(finished):
    config, result = finished
    folder = config.folder
    for name in ("report.md", "results.csv", "results.parquet", "summary.csv", "tost.csv", "val_loss.png",
                 "max_vio.png", "expert_load.png", "fluctuation.png", "experiment.json"):
        assert (folder / name).is_file(), name
    for key in ("mixtral", "hash", "dense"):
        for seed in (0, 1):
            run = folder / f"{key}-seed{seed}"
            assert (run / "model.pt").is_file() and (run / "probe_routing.npz").is_file()
            assert (run / "val_routing.npz").is_file()
    with (folder / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["router"] for r in rows} == {"mixtral", "hash", "dense"}
    import pyarrow.parquet as pq

    assert pq.read_table(folder / "results.parquet").num_rows == 6


def test_report_numbers_come_from_the_runs(finished):
    config, result = finished
    folder = config.folder
    losses = [last_eval(folder / f"mixtral-seed{s}")["val_loss"] for s in (0, 1)]
    mean, std = sum(losses) / 2, abs(losses[0] - losses[1]) / math.sqrt(2)
    agg = next(a for a in result["aggregates"] if a["router"] == "mixtral")
    assert agg["val_loss_mean"] == pytest.approx(mean) and agg["val_loss_std"] == pytest.approx(std)
    report = (folder / "report.md").read_text()
    assert f"| mixtral | {mean:.4f} ± {std:.4f} |" in report

    # MaxVio averaged over training steps, recomputed from the per-step rows
    rows = [r for r in read_metrics(folder / "mixtral-seed0" / "metrics.jsonl") if r["kind"] == "train"]
    loads_mean = np.mean([np.mean(r["max_vio"]) for r in rows])
    run0 = next(r for r in result["rows"] if r["router"] == "mixtral" and r["seed"] == 0)
    assert run0["max_vio_avg"] == pytest.approx(loads_mean)

    # final fluctuation recomputed from the saved probe routing with Python sets
    probe = np.load(folder / "mixtral-seed0" / "probe_routing.npz")
    before, after = probe["topk_idx"][-2], probe["topk_idx"][-1]
    changed = [
        set(b[b >= 0].tolist()) != set(a[a >= 0].tolist())
        for layer_b, layer_a in zip(before, after) for b, a in zip(layer_b, layer_a)
    ]
    assert run0["fluctuation_final"] == pytest.approx(sum(changed) / len(changed))

    # MaxVio of the final validation loads, from the logged per-expert loads
    load = np.asarray(last_eval(folder / "mixtral-seed0")["load"])
    max_vio = ((load.max(1) - load.mean(1)) / load.mean(1)).mean()
    assert run0["max_vio_final"] == pytest.approx(max_vio, rel=1e-5)

    # TOST against the baseline (the first router) from the per-seed losses
    hash_losses = [last_eval(folder / f"hash-seed{s}")["val_loss"] for s in (0, 1)]
    expected = tost(hash_losses, losses, 0.5)
    row = next(r for r in result["tost"] if r["router"] == "hash")
    assert row["p_value"] == pytest.approx(expected.p_value) and row["baseline"] == "mixtral"

    dense = next(a for a in result["aggregates"] if a["router"] == "dense")
    assert dense["max_vio_avg_mean"] is None and dense["val_loss_mean"] is not None


def test_serving_columns_come_from_the_saved_validation_routing(finished, tmp_path):
    config, result = finished
    folder = config.folder / "mixtral-seed0"
    saved = np.load(folder / "val_routing.npz")
    # the saved routing is what the final model does on the validation windows
    from routelab.lab.batches import eval_batches
    from routelab.lab.checkpoint import load_model
    from routelab.lab.data import PreparedCorpus

    model, _, meta = load_model(folder)
    corpus = PreparedCorpus(next((config.folder.parent.parent / "cache").iterdir()))
    batches = eval_batches(corpus.tokens("val"), corpus.domain_labels("val"), 16, 4, 256)
    with torch.no_grad():
        outs = [model(b.inputs) for b in batches]
    for layer in range(2):
        expected = torch.cat([o.routings[layer].topk_idx for o in outs]).numpy()
        assert np.array_equal(saved["topk_idx"][layer], expected)
    assert np.array_equal(saved["token_ids"], torch.cat([b.inputs for b in batches]).numpy())
    row = next(r for r in result["rows"] if r["router"] == "mixtral" and r["seed"] == 0)
    assert 0.0 <= row["lru_hit_2k"] <= 1.0 and 0.0 <= row["sch_2k"] <= 1.0
    assert row["ep_max_mean"] >= 1.0 and row["llep_speedup"] > 0
    dense = next(r for r in result["rows"] if r["router"] == "dense")
    assert dense["sch_2k"] is None
    assert "topk_idx" not in np.load(config.folder / "dense-seed0" / "val_routing.npz").files


def test_finished_runs_are_skipped(finished, tmp_path):
    config, _ = finished
    model_file = config.folder / "hash-seed1" / "model.pt"
    stamp = model_file.stat().st_mtime_ns
    result = run_experiment(config, console=Console(quiet=True), show_progress=False,
                            cache_dir=config.folder.parent.parent / "cache")
    assert model_file.stat().st_mtime_ns == stamp
    assert len(result["rows"]) == 6


def test_run_metrics_are_pluggable(finished):
    config, _ = finished
    summary = json.loads((config.folder / "mixtral-seed0" / "summary.json").read_text())
    record = RunRecord.load("mixtral", "mixtral", 0, config.folder / "mixtral-seed0")

    @register_run_metric("probe-token-count", "tokens in the probe batch")
    def probe_tokens(run):
        return {"probe_tokens": float(run.probe_routing()["token_ids"].size)}

    try:
        columns = run_columns(record)
        assert columns["probe_tokens"] == 2 * 16
        assert columns["val_loss"] == summary["final_eval"]["val_loss"]
    finally:
        RUN_METRICS._entries.pop("probe-token-count")


def test_experiment_files_and_errors(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("name: from-yaml\nrouters: [mixtral, {name: expert-choice, label: ec2, options: {capacity_factor: 2.0}}]\n"
                         "seeds: [0, 1]\nmodel: {d_model: 32, n_heads: 2}\ntrain: {steps: 3}\n")
    config = load_experiment(yaml_file)
    assert [r.key for r in config.routers] == ["mixtral", "ec2"] and config.model.d_model == 32
    toml_file = tmp_path / "exp.toml"
    toml_file.write_text('name = "t"\nrouters = ["hash"]\n[train]\nsteps = 5\n')
    assert load_experiment(toml_file, {"train": {"lr": 0.01}}).train.lr == 0.01
    with pytest.raises(ConfigError, match="not a known router preset"):
        load_experiment({"routers": ["mixtrall"]})
    with pytest.raises(ConfigError, match="has no option 'capacity'"):
        load_experiment({"routers": [{"name": "mixtral", "options": {"capacity": 1}}]})
    with pytest.raises(ConfigError, match=r"model.d_modle: unknown setting. Did you mean 'd_model'"):
        load_experiment({"routers": ["mixtral"], "model": {"d_modle": 3}})
    with pytest.raises(ConfigError, match="train.steps"):
        load_experiment({"routers": ["mixtral"], "train": {"steps": 0}})
    with pytest.raises(ConfigError, match="unique"):
        load_experiment({"routers": ["mixtral", "mixtral"]})
    with pytest.raises(ConfigError, match="baseline"):
        load_experiment({"routers": ["mixtral"], "baseline": "hash"})
    with pytest.raises(ConfigError, match="lists no routers"):
        load_experiment({})
    (tmp_path / "broken.yaml").write_text("routers: [mixtral\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_experiment(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match=r"^experiment file .* must end in \.yaml, \.yml or \.toml"):
        (tmp_path / "exp.json").write_text("{}")
        load_experiment(tmp_path / "exp.json")


def test_changed_settings_need_a_new_name(finished):
    config, _ = finished
    data = config.model_dump()
    data["train"]["lr"] = 0.5
    changed = load_experiment(data)
    with pytest.raises(ConfigError, match="another name"):
        run_experiment(changed, console=Console(quiet=True), show_progress=False,
                       cache_dir=config.folder.parent.parent / "cache")
