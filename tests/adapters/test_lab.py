"""The adapter lab at a smoke budget, through the command line: every method, report, resume."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from routelab.cli import app
from tests.lab_helpers import write_corpus


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_lab")
    source = write_corpus(root / "text")
    out = root / "out"
    env = {"ROUTELAB_CACHE": str(root / "cache")}
    args = ["adapters", "compare", "--smoke", "--out", str(out), "--corpus", str(source), "--no-progress", "--threads", "1"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return out, args, env, result.output


def test_every_method_reports_held_in_and_held_out_tasks(smoke_run) -> None:
    out, _, _, output = smoke_run
    report = (out / "report.md").read_text()
    methods = ["base", "oracle", "multitask", "uniform", "poly", "mhr", "glider", "topk", "remix"]
    for method in methods:
        assert f"| {method} |" in report
        result = json.loads((out / "results" / f"{method}.json").read_text())
        assert set(result["held_out"]) == {"reverse+upper", "caesar+vowels", "reverse+vowels"}
        assert all(0 <= v["accuracy"] <= 1 and v["loss"] > 0 for v in result["held_in"].values())
    for name in ("routing_matrix.png", "effective_support.png", "held_in_vs_out.png", "results.csv"):
        assert (out / name).is_file()
    assert (out / "traces" / "topk.trace" / "trace.json").is_file()
    assert "held-in loss" in output


def test_routing_matrices_and_effective_support_follow_each_method(smoke_run) -> None:
    out = smoke_run[0]
    load = lambda m: json.loads((out / "results" / f"{m}.json").read_text())  # noqa: E731
    oracle = load("oracle")
    for i, (task, scores) in enumerate(oracle["held_in"].items()):
        assert scores["routing"][i] == pytest.approx(1.0)  # each task on its own expert
    remix, uniform = load("remix"), load("uniform")
    assert all(v["effective_support"] == pytest.approx(2.0) for v in remix["held_in"].values())  # constant 1/k
    assert all(v["effective_support"] == pytest.approx(6.0) for v in uniform["held_out"].values())  # 6 experts
    for v in load("mhr")["held_out"].values():
        assert sum(v["routing"]) == pytest.approx(1.0) and len(v["routing"]) == 2  # folded over heads: 2 skills


def test_rerun_continues_and_other_settings_are_refused(smoke_run) -> None:
    out, args, env, _ = smoke_run
    stamp = (out / "results" / "poly.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0, again.output
    assert (out / "results" / "poly.json").stat().st_mtime_ns == stamp
    bad = CliRunner().invoke(app, ["adapters", "compare", "--out", str(out), "--no-progress"], env=env)
    assert bad.exit_code == 2 and "other settings" in bad.output
