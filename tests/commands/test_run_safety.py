"""One writer per output folder, resumes that cannot mix two runs, and a full disk.

* two ``routelab train`` into one folder: exactly one proceeds, the other is refused naming
  the holder, and the survivor's outputs equal those of a run alone;
* ``routelab trace --resume`` refuses another checkpoint, corpus, --seq-len, --batch-size or
  --max-tokens than the trace was started with, and continues an identical one exactly;
* a full disk (a tiny tmpfs in a private mount namespace, skipped where that is not
  possible) ends as one error line; the checkpoint before it is intact and ``--resume``
  finishes the run with the same result as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.lab_helpers import write_corpus
from typer.testing import CliRunner

from routelab.cli import app
from routelab.core.run_lock import LOCK_FILE, FolderInUseError, FolderLock
from routelab.traces import Trace

runner = CliRunner()
TIMING_KEYS = {"step_time_s", "tokens_per_s"}
TINY = ["--router", "loss-free", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--num-experts", "4",
        "--expert-d-hidden", "32", "--seq-len", "16", "--batch-size", "4", "--precision", "fp32", "--no-progress",
        "--threads", "1", "--vocab-size", "300"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    return {"root": root, "corpus": write_corpus(root / "text", files_per_domain=4), "cache": root / "cache"}


def train_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--corpus", str(data["corpus"]), "--cache-dir", str(data["cache"]), "--out", str(out),
            *extra]


def routelab_command() -> list[str]:
    script = Path(sys.executable).with_name("routelab")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from routelab.cli import main; main()"]


def checkpoint_bytes_estimate(model_file: Path) -> int:
    """Size of a training checkpoint of this model: the model file plus AdamW's two moments."""
    payload = torch.load(model_file, weights_only=True)
    moments = {name: {k: v.clone() for k, v in payload["model"].items() if v.is_floating_point()}
               for name in ("exp_avg", "exp_avg_sq")}
    buffer = io.BytesIO()
    torch.save({**payload, "optimizer": moments}, buffer)
    return len(buffer.getvalue()) + 16 * 1024


def comparable_metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable_metrics(a) == comparable_metrics(b)
    weights_a = torch.load(a / "model.pt", weights_only=True)["model"]
    weights_b = torch.load(b / "model.pt", weights_only=True)["model"]
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0)


def test_folder_lock_names_its_holder_and_cleans_up(tmp_path):
    folder = tmp_path / "new" / "run"
    with FolderLock(folder, "run folder"):
        holder = json.loads((folder / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(FolderInUseError, match=f"in use by pid {os.getpid()} on "):
            FolderLock(folder, "run folder").acquire()
    assert not (tmp_path / "new").exists()  # created for nothing: removed again
    with FolderLock(folder, "run folder"):
        (folder / "out.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["out.txt"]


def test_two_trains_into_one_folder(data, tmp_path):
    solo, shared = tmp_path / "solo", tmp_path / "shared"
    args = ["--steps", "8", "--eval-every", "4"]
    alone = runner.invoke(app, train_args(data, solo, *args))  # also prepares the corpus cache
    assert alone.exit_code == 0, alone.output
    first = subprocess.Popen([*routelab_command(), *train_args(data, shared, *args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (shared / LOCK_FILE).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        # the second writer enters train's folder lock the moment the first holds it (milliseconds, so
        # the first is still training whatever the machine's speed)
        second_lock = FolderLock(shared, "run folder")
        with pytest.raises(FolderInUseError) as refused:
            second_lock.acquire()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert f"is in use by pid {first.pid} on " in str(refused.value) and "routelab train" in str(refused.value)
    assert not (shared / LOCK_FILE).exists()
    assert_same_run(shared, solo)
    # the same refusal from the command line: one error line, exit code 2, nothing changed
    with FolderLock(shared, "run folder"):
        before = sorted(p.name for p in shared.iterdir())
        second = runner.invoke(app, train_args(data, shared, *args, "--resume"))
        assert sorted(p.name for p in shared.iterdir()) == before
    assert second.exit_code == 2 and second.stderr.count("\n") == 1
    assert second.stderr.startswith(f"error: run folder {str(shared)!r} is in use by pid {os.getpid()} ")
    assert_same_run(shared, solo)


@pytest.fixture(scope="module")
def lab_run(data) -> Path:
    run = data["root"] / "run"
    result = runner.invoke(app, train_args(data, run, "--steps", "2", "--eval-every", "2"))
    assert result.exit_code == 0, result.output
    return run


def trace_args(run: Path, out: Path, data: dict[str, Path], *extra: str) -> list[str]:
    return ["trace", str(run / "model.pt"), "--out", str(out), "--cache-dir", str(data["cache"]), "--seq-len", "8",
            "--batch-size", "2", *extra]


def test_trace_resume_must_match_the_trace_header(data, lab_run, tmp_path, monkeypatch):
    import routelab.traces.corpus as corpus_module

    full, part = tmp_path / "full.trace", tmp_path / "part.trace"
    assert runner.invoke(app, trace_args(lab_run, full, data)).exit_code == 0
    record = corpus_module.record_corpus

    def interrupted(*args, **kwargs):  # commit after every batch, then a Ctrl-C after the third
        calls = []

        def on_batch(n):
            calls.append(n)
            if len(calls) == 3:
                raise KeyboardInterrupt

        return record(*args, **{**kwargs, "commit_every": 1, "on_batch": on_batch})

    monkeypatch.setattr(corpus_module, "record_corpus", interrupted)
    stopped = runner.invoke(app, trace_args(lab_run, part, data))
    monkeypatch.setattr(corpus_module, "record_corpus", record)
    assert stopped.exit_code == 130 and "--resume" in stopped.stderr
    assert Trace.open(part, allow_incomplete=True).num_tokens == 2 * 2 * 8

    other_run = tmp_path / "other_run"
    shutil.copytree(lab_run, other_run)
    payload = torch.load(other_run / "model.pt", weights_only=True)
    first_key = next(iter(payload["model"]))
    payload["model"][first_key] = payload["model"][first_key] + 1
    torch.save(payload, other_run / "model.pt")
    other_text = tmp_path / "other.txt"
    other_text.write_text("some other text to trace " * 20)
    header_before = (part / "trace.json").read_text()
    refusals = [
        (trace_args(lab_run, part, data, "--resume", "--seq-len", "4"), "--seq-len was 8, now 4"),
        (trace_args(lab_run, part, data, "--resume", "--batch-size", "3"), "--batch-size was 2, now 3"),
        (trace_args(lab_run, part, data, "--resume", "--max-tokens", "64"), "--max-tokens was None, now 64"),
        (trace_args(other_run, part, data, "--resume"), "CHECKPOINT (its content) differs"),
        (trace_args(lab_run, part, data, "--resume", "--corpus", str(other_text)), "--corpus (its content) differs"),
    ]
    for argv, message in refusals:
        result = runner.invoke(app, argv)
        assert result.exit_code == 2 and message in result.stderr, (argv, result.stderr)
        assert result.stderr.count("\n") == 1
        assert (part / "trace.json").read_text() == header_before  # untouched

    resumed = runner.invoke(app, trace_args(lab_run, part, data, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    a, b = Trace.open(full), Trace.open(part)
    assert a.num_tokens == b.num_tokens
    for layer in range(a.num_layers):
        np.testing.assert_array_equal(a.layer(layer).topk_idx, b.layer(layer).topk_idx)
    np.testing.assert_array_equal(a.tokens().token_id, b.tokens().token_id)


def test_failed_trace_leaves_no_stub(data, lab_run, tmp_path, monkeypatch):
    import routelab.traces.corpus as corpus_module

    def broken(*args, **kwargs):
        raise corpus_module.InputError("the corpus produced no tokens to trace")

    monkeypatch.setattr(corpus_module, "record_corpus", broken)
    out = tmp_path / "t.trace"
    result = runner.invoke(app, trace_args(lab_run, out, data))
    assert result.exit_code == 2 and not out.exists()


def _namespace_mounts_work(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


# Runs inside the private mount namespace, in one interpreter: the full disk, the read-only
# folder, then --resume after the disk was given room.
NAMESPACE_SCRIPT = """
import json, os, subprocess, sys
from typer.testing import CliRunner
from routelab.cli import app
plan = json.loads(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={plan['size_kb']}k", "tmpfs", plan["disk"]], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", plan["read_only_folder"]], check=True)
runner, out = CliRunner(), {}
for name in ("full", "read_only", "resume"):
    if name == "resume":
        subprocess.run(["mount", "-o", "remount,size=64m", plan["disk"]], check=True)
    result = runner.invoke(app, plan[name])
    out[name] = {"code": result.exit_code, "stderr": result.stderr, "files": sorted(os.listdir(plan["run"]))}
subprocess.run(["cp", "-r", plan["run"], plan["copy"]], check=True)
print(json.dumps(out))
"""


def test_full_disk_and_read_only_folder(data, tmp_path):
    if not _namespace_mounts_work(tmp_path):
        pytest.skip("needs unshare and tmpfs mounts in a user namespace")
    args = ["--steps", "6", "--eval-every", "3", "--checkpoint-every", "2"]
    solo = tmp_path / "solo"
    assert runner.invoke(app, train_args(data, solo, *args)).exit_code == 0
    # Room for the run's small files and one checkpoint, not for a second copy during the atomic replace.
    size_kb = (checkpoint_bytes_estimate(solo / "model.pt") * 3 // 2 + 48 * 1024) // 1024
    disk, read_only = tmp_path / "disk", tmp_path / "ro"
    disk.mkdir()
    read_only.mkdir()
    run = disk / "run"
    plan = {"size_kb": size_kb, "disk": str(disk), "read_only_folder": str(read_only), "run": str(run),
            "copy": str(tmp_path / "resumed"), "full": train_args(data, run, *args),
            "read_only": train_args(data, read_only / "run", *args), "resume": train_args(data, run, *args, "--resume")}
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", NAMESPACE_SCRIPT, json.dumps(plan)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    full = out["full"]
    assert full["code"] == 2 and full["stderr"].count("\n") == 1, full
    assert full["stderr"].startswith("error: no space left on the device") and "checkpoint.pt" in full["stderr"]
    assert "checkpoint.pt" in full["files"] and not [name for name in full["files"] if ".tmp" in name]
    ro = out["read_only"]
    assert ro["code"] == 2 and ro["stderr"].count("\n") == 1, ro
    assert "cannot write" in ro["stderr"] and "Read-only file system" in ro["stderr"]
    assert out["resume"]["code"] == 0, out["resume"]
    assert_same_run(tmp_path / "resumed", solo)
