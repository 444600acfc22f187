"""`reproduce --jobs`: runs trained in worker processes equal the same runs trained one after
the other, a failing run is named, and a bad --jobs is one error line."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from tests.lab_helpers import write_corpus
from typer.testing import CliRunner

import routelab
from routelab.cli import app
from routelab.lab.claims import reproduce
from routelab.lab.claims.pool import RunFailed, WorkerSetup, train_in_parallel
from routelab.lab.claims.runs import RunSpec


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text"))


def run_metrics(out):
    """Each run folder's metrics, except its speed."""
    metrics = {p.name: json.loads((p / "claim_metrics.json").read_text())["metrics"] for p in out.iterdir() if p.is_dir()}
    return {name: {k: v for k, v in m.items() if k != "tokens_per_s"} for name, m in metrics.items()}


def test_parallel_runs_equal_serial_runs(corpus_dir, tmp_path):
    quiet = Console(stderr=True, quiet=True)
    common = {"corpus_source": str(corpus_dir), "cache_dir": tmp_path / "cache", "sweep": False, "console": quiet,
              "show_progress": False}
    serial = reproduce("ssr", "smoke", out=tmp_path / "serial", **common)
    parallel = reproduce("ssr", "smoke", out=tmp_path / "parallel", jobs=2, **common)
    assert serial.trained_now == parallel.trained_now == 4  # ssr and aux, two seeds each
    one, two = run_metrics(tmp_path / "serial"), run_metrics(tmp_path / "parallel")
    assert one.keys() == two.keys() and len(one) == 4  # the same run folders (settings hashes)
    assert one == two  # and bit-identical metrics
    assert [r.result.difference for r in serial.rows] == [r.result.difference for r in parallel.rows]


def test_a_failing_run_is_named(corpus_dir, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folders should go")
    setup = WorkerSetup("smoke", {"source": str(corpus_dir)}, str(tmp_path / "cache"), str(blocker), 1)
    specs = [RunSpec("aux", 2, 0), RunSpec("hash", 2, 0)]
    reproduce("ssr", "smoke", out=tmp_path / "warm", corpus_source=str(corpus_dir), cache_dir=tmp_path / "cache",
              train=False, console=Console(quiet=True))  # prepares the corpus cache the workers read
    with pytest.raises(RunFailed, match=r"run (aux|hash) 2 steps s0 .* failed in its worker"):
        train_in_parallel(setup, specs, 2, Console(quiet=True), False, lambda spec: blocker / spec.arm)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1,2"])
def test_bad_jobs_is_one_error_line(tmp_path, value):
    result = CliRunner().invoke(app, ["reproduce", "ssr", "--budget", "smoke", "--jobs", value,
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--jobs" in result.output
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_claims_folder_in_use(corpus_dir, tmp_path):
    from routelab.core.run_lock import FolderLock

    out = tmp_path / "claims"
    with FolderLock(out, "claims folder"):
        result = CliRunner().invoke(app, ["reproduce", "ssr", "--budget", "smoke", "--out", str(out), "--corpus",
                                          str(corpus_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert result.exit_code == 2 and "claims folder" in result.output and "is in use by pid" in result.output
    assert not out.exists()  # nothing trained (the lock removed the folder it made)


def test_a_worker_that_cannot_start_says_why(tmp_path):
    setup = WorkerSetup("smoke", {"source": str(tmp_path / "no-such-corpus")}, str(tmp_path / "cache"),
                        str(tmp_path / "out"), 1)
    with pytest.raises(routelab.RoutelabError, match="a training worker, starting,.*no-such-corpus"):
        train_in_parallel(setup, [RunSpec("aux", 2, 0)], 1, Console(quiet=True), False, lambda spec: tmp_path)
