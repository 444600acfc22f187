"""`routelab claims list` and `routelab reproduce` at the smoke budget: every claim gets a row,
runs are trained once and reused, re-running trains nothing, bad input is one error line."""

from __future__ import annotations

import json
import statistics

import pytest
from tests.lab_helpers import write_corpus
from typer.testing import CliRunner

from routelab.cli import app
from routelab.lab.claims import CLAIMS, get_budget, planned_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text"))


def test_claims_list():
    result = runner.invoke(app, ["claims", "list", "--budget", "smoke"])
    assert result.exit_code == 0, result.output
    for claim in CLAIMS:
        assert claim.name in result.output
    assert f"trains {len(planned_runs(list(CLAIMS), get_budget('smoke')))} runs" in result.output


def test_reproduce_all_at_the_smoke_budget(corpus_dir, tmp_path):
    out = tmp_path / "claims"
    args = ["reproduce", "all", "--budget", "smoke", "--out", str(out), "--corpus", str(corpus_dir),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    specs = planned_runs(list(CLAIMS), get_budget("smoke"))
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == len(specs)  # each distinct run once, shared between claims
    assert all((p / "summary.json").is_file() and (p / "claim_metrics.json").is_file() for p in folders)
    arms = {json.loads((p / "claim_run.json").read_text())["arm"] for p in folders}
    assert {"aux", "dlm-ecdlm", "aux-shared"} <= arms
    report = (out / "claims-smoke.md").read_text()
    for claim in CLAIMS:
        assert f"`routelab reproduce {claim.id} --budget smoke`" in report
        for check in claim.checks:
            assert f"| {check.label} |" in report
    assert "## Budget sweep" in report and "not yet run" not in report
    assert "prediction" in report
    by_arm: dict[str, list[float]] = {}
    for p in folders:
        info = json.loads((p / "claim_run.json").read_text())
        if info["steps"] == get_budget("smoke").steps and info["model"].get("objective") != "masked-diffusion":
            by_arm.setdefault(info["arm"], []).append(json.loads((p / "claim_metrics.json").read_text())["metrics"]["val_loss"])
    sigma = statistics.fmean(statistics.variance(v) for v in by_arm.values()) ** 0.5  # 2 seeds each: 1 dof per arm
    assert f"standard deviation of {sigma:.4f} nats (pooled over {len(by_arm)} causal-LM arms" in report
    diffusion = next(p for p in folders if json.loads((p / "claim_run.json").read_text())["arm"] == "dlm-ec")
    assert json.loads((diffusion / "config.json").read_text())["model_config"]["objective"] == "masked-diffusion"

    mtimes = {p: (p / "summary.json").stat().st_mtime_ns for p in folders}
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"({len(specs)} finished, 0 to train)" in again.output
    assert all((p / "summary.json").stat().st_mtime_ns == mtimes[p] for p in folders)


def test_report_only_shows_missing_runs_as_not_yet_run(corpus_dir, tmp_path):
    result = runner.invoke(app, ["reproduce", "bip", "--budget", "smoke", "--out", str(tmp_path / "c"),
                                 "--corpus", str(corpus_dir), "--cache-dir", str(tmp_path / "cache"), "--no-train"])
    assert result.exit_code == 0, result.output
    assert "not yet run" in (tmp_path / "c" / "claims-smoke.md").read_text()
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]


def test_bad_claim_and_budget_are_one_error_line(tmp_path):
    for args, word in ((["reproduce", "nope", "--out", str(tmp_path)], "unknown claim"),
                       (["reproduce", "1", "--budget", "huge", "--out", str(tmp_path)], "unknown budget")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and word in result.output
    assert not list(tmp_path.iterdir())
