"""`routelab launch --nproc 2 train --expert-parallel 2` (torch.distributed.run) follows the
single-process `routelab train` run, writes a run folder the lab reads, and bad settings end
with an error line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from routelab.cli import app
from routelab.lab.checkpoint import load_model
from tests.lab_helpers import write_corpus

FLAGS = ["--router", "deepseek-v3", "--steps", "3", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
         "--num-experts", "4", "--expert-d-hidden", "32", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3",
         "--eval-tokens", "256", "--precision", "fp32", "--no-progress", "--threads", "1", "--vocab-size", "300"]


def launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "routelab", "launch", "--nproc", "2", *args],
                          capture_output=True, text=True, timeout=240, env=env)


def losses(folder) -> list[float]:  # noqa: ANN001
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"] + [r["val_loss"] for r in rows if r["kind"] == "eval"]


@pytest.mark.slow
def test_launch_train_expert_parallel_follows_single_process(tmp_path) -> None:
    corpus = ["--corpus", str(write_corpus(tmp_path / "text")), "--cache-dir", str(tmp_path / "cache")]
    single = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "single"), *FLAGS, *corpus])
    assert single.exit_code == 0, single.output
    result = launch(["train", "--expert-parallel", "2", "--out", str(tmp_path / "ep"), *FLAGS, *corpus])
    assert result.returncode == 0, result.stderr[-3000:]
    ep, reference = losses(tmp_path / "ep"), losses(tmp_path / "single")
    assert len(ep) == len(reference) == 4
    assert max(abs(a - b) for a, b in zip(ep, reference)) < 1e-5
    model, _, _ = load_model(tmp_path / "ep" / "model.pt")  # the lab's single-process format
    assert model.blocks[0].ffn.experts.num_experts == 4
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    assert summary["parallel"] == {"processes": 2, "expert_parallel": 2, "llep": None}
    assert not (tmp_path / "ep" / "checkpoint.dcp").exists()  # removed once finished, like checkpoint.pt



def test_launch_reports_the_failed_ranks(monkeypatch) -> None:
    """A failed job (torch.distributed.run raises ChildFailedError) ends as one error line naming the ranks."""
    import torch.distributed.run as distributed_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    launched = {}

    def fail(args) -> None:  # noqa: ANN001
        launched["args"] = args
        failure = ProcessFailure(local_rank=1, pid=123, exitcode=3, error_file="<none>")
        raise ChildFailedError("routelab", {1: failure})

    monkeypatch.setattr(distributed_run, "run", fail)
    result = CliRunner().invoke(app, ["launch", "--nproc", "2", "train", "--expert-parallel", "2", "--steps", "1"])
    assert result.exit_code == 2
    assert "error: the job failed: rank 1 (exit code 3)" in " ".join(result.output.split())
    assert launched["args"].nproc_per_node == "2" and launched["args"].training_script == "routelab"
    assert launched["args"].training_script_args == ["train", "--expert-parallel", "2", "--steps", "1"]


def test_launch_needs_a_command() -> None:
    result = CliRunner().invoke(app, ["launch", "--nproc", "2"])
    assert result.exit_code == 2 and "give the routelab command to run" in " ".join(result.output.split())


def test_expert_parallel_outside_a_distributed_launch_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["train", "--expert-parallel", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "needs a distributed launch" in result.output and "routelab launch --nproc 2" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
    llep_alone = CliRunner().invoke(app, ["train", "--llep", "1.3", "--out", str(tmp_path / "run")])
    assert llep_alone.exit_code == 2 and "--llep needs --expert-parallel" in llep_alone.output
