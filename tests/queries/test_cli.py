"""``routelab queries list`` / ``evaluate``: outputs, resuming, one-line errors with nothing written."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from routelab.cli import app

runner = CliRunner()


def test_list_shows_datasets_and_routers():
    result = runner.invoke(app, ["queries", "list"])
    assert result.exit_code == 0, result.output
    for name in ("routellm-mmlu", "llmrouter-9", "routerarena-sub10", "sw-ranking", "linucb"):
        assert name in result.output


def test_evaluate_writes_report_and_resumes(tmp_path):
    args = ["queries", "evaluate", "--datasets", "routellm-mt-bench", "--routers", "random,knn,linucb",
            "--seeds", "0,1", "-o", "knn.k=5", "--out-dir", str(tmp_path), "--name", "mt", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "mt"
    for name in ("report.md", "results.csv", "results.parquet", "summary.csv", "summary.parquet", "curves.parquet",
                 "leaderboard.json", "quality_vs_cost_routellm-mt-bench.png"):
        assert (folder / name).is_file(), name
    report = (folder / "report.md").read_text()
    assert "APGR" in report and "appendix D" in report
    aggregates = json.loads((folder / "leaderboard.json").read_text())["aggregates"]
    assert {a["router"] for a in aggregates} == {"random", "knn", "linucb"} and all(a["seeds"] == 2 for a in aggregates)
    run_file = folder / "runs" / "routellm-mt-bench" / "knn-seed1.json"
    stamp = run_file.stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and run_file.stat().st_mtime_ns == stamp  # reused, not rerun
    changed = runner.invoke(app, [*args, "-o", "knn.k=7"])  # other options (the last -o wins): rerun
    assert changed.exit_code == 0 and run_file.stat().st_mtime_ns != stamp


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
    for args in (["--routers", "knnn"], ["--datasets", "nope"], ["-o", "knn.k=3", "--routers", "random"],
                 ["-o", "kk"], ["--seeds", "a"]):
        result = runner.invoke(app, ["queries", "evaluate", *args, "--out-dir", str(tmp_path), "--no-progress"])
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output
    assert not any(tmp_path.iterdir())


def test_user_table_path(tmp_path):
    from routelab.queries import load_dataset

    table = tmp_path / "mine.csv"
    import pyarrow.csv as pacsv

    pacsv.write_csv(load_dataset("routellm-gsm8k").subset(range(120)).to_long(), table)
    result = runner.invoke(app, ["queries", "evaluate", "--datasets", str(table), "--routers", "cheapest,oracle",
                                 "--out-dir", str(tmp_path / "runs"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "query routing: mine" in result.output  # a table is named after its file


def test_evaluation_file_with_labelled_routers(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        "name: from-file\n"
        "datasets: [routellm-mt-bench]\n"
        "seeds: [0]\n"
        f"out_dir: {tmp_path / 'runs'}\n"
        "routers: [cheapest, {name: knn, label: knn-k3, options: {k: 3}}, {name: knn, label: knn-k9, options: {k: 9}}]\n"
    )
    result = runner.invoke(app, ["queries", "evaluate", str(config), "-o", "knn-k9.weighting=uniform", "--no-progress"])
    assert result.exit_code == 0, result.output
    aggregates = json.loads((tmp_path / "runs" / "from-file" / "leaderboard.json").read_text())["aggregates"]
    assert {a["router"] for a in aggregates} == {"cheapest", "knn-k3", "knn-k9"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("routers: [knn]\nlearning_rate: 3\n")
    refused = runner.invoke(app, ["queries", "evaluate", str(bad)])
    assert refused.exit_code == 2 and "unknown key(s) ['learning_rate']" in refused.output


def test_evaluate_refuses_a_folder_another_process_writes(tmp_path):
    from routelab.core.run_lock import FolderLock

    with FolderLock(tmp_path / "mt", "query evaluation folder"):
        result = runner.invoke(app, ["queries", "evaluate", "--datasets", "routellm-mt-bench", "--routers", "random",
                                     "--out-dir", str(tmp_path), "--name", "mt", "--no-progress"])
    assert result.exit_code == 2 and "is in use by pid" in result.output
    assert not (tmp_path / "mt" / "report.md").exists()
