"""Every command x bad inputs: exit code 2, one ``error:`` line on stderr naming the argument,
and nothing written (no run folder, no stub trace, no config.json).

The fixtures (a 2-step lab run, a small synthetic trace, a random-bytes file, a run folder
whose config.json is damaged) are built once per module; every row then runs the command
in-process with an empty working directory and checks the whole tree is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.lab_helpers import TINY_MODEL, small_corpus, tiny_train
from typer.testing import CliRunner

from routelab.cli import app
from routelab.lab.train import train_run
from routelab.traces import TraceWriter

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    corpus = small_corpus(root)
    run = root / "run"
    model_config = TINY_MODEL.tinylm(vocab_size=corpus.vocab_size, max_seq_len=16, router="mixtral", router_options={})
    train_run(run, corpus, model_config, tiny_train(steps=2, eval_every=2), show_progress=False)
    trace = root / "s.trace"
    rng = np.random.default_rng(0)
    with TraceWriter(trace, {"model": "synthetic"}, 2, 8) as writer:
        for seq in range(8):
            token_ids = rng.integers(0, 100, 32)
            for layer in range(2):
                idx = np.stack([rng.permutation(8)[:2] for _ in range(32)])
                writer.add(layer, idx, np.full(idx.shape, 0.5, np.float32), token_ids, np.full(32, seq),
                           np.arange(32), "text")
    junk = root / "junk.pt"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    junk_yaml = root / "junk.yaml"
    junk_yaml.write_bytes(b"\xff\xfe\x00" + np.random.default_rng(2).bytes(512))
    bad_option = root / "bad_option.yaml"
    bad_option.write_text("name: bad\nrouters: [{name: mixtral, options: {aux_loss_coef: abc}}]\nseeds: [0]\n")
    corrupt_run = root / "corrupt_run"
    corrupt_run.mkdir()
    shutil.copy(run / "model.pt", corrupt_run / "checkpoint.pt")
    (corrupt_run / "config.json").write_text('{"model_config": {"d_model": 3')
    text = root / "text"
    return {"root": root, "run": run, "ckpt": run / "model.pt", "trace": trace, "bin": junk, "bin_yaml": junk_yaml,
            "badopt": bad_option, "corrupt_run": corrupt_run, "missing": root / "missing", "corpus": text,
            "cache": root / "cache"}


def tree(path: Path) -> dict[str, int]:
    """Every file and folder under ``path`` with its size (folders: -1), except corpus caches
    (a command may prepare a corpus before an error; a cache entry is not an output)."""
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else -1) for p in sorted(path.rglob("*"))
            if "cache" not in p.relative_to(path).parts}


TRAIN_DATA = ["--corpus", "{corpus}", "--vocab-size", "320", "--cache-dir", "{cache}"]

ROWS = [
    # train
    (["train", "--top-k", ""], "--top-k"),
    (["train", "--top-k", "0"], "--top-k"),
    (["train", "--top-k", "two"], "--top-k"),
    (["train", "--steps", "0"], "steps"),
    (["train", "--steps", "-3"], "steps"),
    (["train", "--steps", "many"], "--steps"),
    (["train", "--seed", "-1"], "seed"),
    (["train", "--lr", "0"], "lr"),
    (["train", "--d-model", "0"], "d_model"),
    (["train", "--num-experts", "-2"], "num_experts"),
    (["train", "--precision", "fp8"], "precision"),
    (["train", "--router", ""], "router"),
    (["train", "--router", "nope"], "router"),
    (["train", "-o", "aux_loss_coef=abc"], "aux_loss_coef"),
    (["train", "-o", "aux_loss_coef"], "--option"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--corpus", "{missing}"], "missing"),
    (["train", "--corpus", "{bin}"], "junk.pt"),
    (["trace", "{ckpt}", "--out", "t.trace", "--corpus", "{bin}"], "holds no UTF-8 text"),
    (["train", "--resume", "--out", "{corrupt_run}", *TRAIN_DATA], "config.json"),
    (["train", "--d-model", "30", "--n-heads", "4", *TRAIN_DATA], "d_model=30"),
    (["train", "--router", "dense", "--top-k", "9"], "top_k=9"),
    (["compare", "--routers", "mixtral", "--d-model", "30", "--n-heads", "4", *TRAIN_DATA], "d_model=30"),
    # compare and demo
    (["compare"], "--routers"),
    (["compare", "{missing}.yaml"], "missing.yaml"),
    (["compare", "{bin_yaml}"], "junk.yaml"),
    (["compare", "{badopt}"], "aux_loss_coef"),
    (["compare", "--routers", "mixtral", "--seeds", "-1"], "--seeds"),
    (["compare", "--routers", "mixtral", "--seeds", ""], "--seeds"),
    (["compare", "--routers", "mixtral", "--margin", "-1"], "margin"),
    (["demo", "--steps", "0"], "steps"),
    (["demo", "--seeds", "a"], "--seeds"),
    (["demo", "--threads", "-1"], "--threads"),
    # trace
    (["trace", "{missing}", "--out", "t.trace"], "missing"),
    (["trace", "{bin}", "--out", "t.trace"], "not a routelab checkpoint"),
    (["trace", "{ckpt}", "--out", "t.trace", "--seq-len", "0"], "--seq-len"),
    (["trace", "{ckpt}", "--out", "t.trace", "--seq-len", "100000"], "--seq-len"),
    (["trace", "{ckpt}", "--out", "t.trace", "--batch-size", "0"], "--batch-size"),
    (["trace", "{ckpt}", "--out", "t.trace", "--max-tokens", "-5"], "--max-tokens"),
    (["trace", "{ckpt}", "--out", "t.trace", "--corpus", "{missing}"], "missing"),
    (["trace", "{ckpt}", "--out", "t.trace", "--device", "tpu9"], "--device"),
    (["trace", "{ckpt}", "--out", "t.trace", "--resume"], "--resume"),
    (["trace", "{ckpt}", "--out", "t.trace", "--resume", "--overwrite"], "--resume"),
    (["trace", "{ckpt}", "--out", "{bin}"], "--out"),
    (["trace", "{corrupt_run}", "--out", "t.trace"], "config.json"),
    (["trace", "--hf", "{missing}", "--corpus", "{corpus}", "--out", "t.trace"], "does not exist"),
    (["trace-hf", "{missing}", "--corpus", "{corpus}", "--out", "t.trace"], "does not exist"),
    # analyze
    (["analyze", "{missing}"], "missing"),
    (["analyze", "{bin}"], "junk.pt"),
    (["analyze", "{trace}", "--windows", ""], "--windows"),
    (["analyze", "{trace}", "--windows", "0"], "--windows"),
    (["analyze", "{trace}", "--windows", "x"], "--windows"),
    (["analyze", "{trace}", "--max-tokens", "0"], "--max-tokens"),
    (["analyze", "{trace}", "--sequence-stride", "0"], "--sequence-stride"),
    (["analyze", "{trace}", "--devices", "-1"], "--devices"),
    # simulate
    (["simulate", "cache", "{trace}", "--sizes", ""], "--sizes"),
    (["simulate", "cache", "{trace}", "--sizes", "0"], "--sizes"),
    (["simulate", "cache", "{trace}", "--sizes", "x"], "--sizes"),
    (["simulate", "cache", "{trace}", "--max-tokens", "0"], "--max-tokens"),
    (["simulate", "cache", "{trace}", "--max-tokens", "-5"], "--max-tokens"),
    (["simulate", "cache", "{trace}", "--bandwidth-gbs", "0"], "--bandwidth-gbs"),
    (["simulate", "cache", "{trace}", "--expert-mb", "-1"], "--expert-mb"),
    (["simulate", "cache", "{trace}", "--compute-ms", "-1"], "--compute-ms"),
    (["simulate", "cache", "{trace}", "--policies", ""], "--policies"),
    (["simulate", "cache", "{trace}", "--scope", "bogus"], "scope"),
    (["simulate", "cache", "{trace}", "--prefetch-width", "0"], "--prefetch-width"),
    (["simulate", "cache", "{bin}"], "junk.pt"),
    (["simulate", "ep", "{trace}", "--tflops", "0"], "--tflops"),
    (["simulate", "ep", "{trace}", "--tflops", "-1"], "--tflops"),
    (["simulate", "ep", "{trace}", "--link-gbs", "0"], "--link-gbs"),
    (["simulate", "ep", "{trace}", "--d-model", "0"], "--d-model"),
    (["simulate", "ep", "{trace}", "--d-hidden", "-4"], "--d-hidden"),
    (["simulate", "ep", "{trace}", "--max-tokens", "-5"], "--max-tokens"),
    (["simulate", "ep", "{trace}", "--devices", "0"], "--devices"),
    (["simulate", "ep", "{trace}", "--batch-tokens", "0"], "--batch-tokens"),
    (["simulate", "ep", "{trace}", "--lambda", "0.5"], "--lambda"),
    (["simulate", "ep", "{trace}", "--alpha", "0"], "--alpha"),
    (["simulate", "ep", "{trace}", "--min-chunk", "0"], "--min-chunk"),
    (["simulate", "ep", "{trace}", "--gate", "bogus"], "gate"),
    (["simulate", "ep", "{trace}", "--tflops", "fast"], "--tflops"),
    (["simulate", "schedule", "{trace}", "--batch-size", "0"], "--batch-size"),
    (["simulate", "schedule", "{trace}", "--unit", "bogus"], "unit"),
    (["simulate", "schedule", "{trace}", "--pool", "0"], "--pool"),
    (["simulate", "schedule", "{missing}"], "missing"),
    # queries
    (["queries", "evaluate", "--seeds", "-1"], "--seeds"),
    (["queries", "evaluate", "--seeds", "x"], "--seeds"),
    (["queries", "evaluate", "--routers", ","], "--routers"),
    (["queries", "evaluate", "--routers", "nope"], "router"),
    (["queries", "evaluate", "--datasets", "{missing}.csv"], "missing.csv"),
    (["queries", "evaluate", "-o", "knn"], "--option"),
    # adapters
    (["adapters", "compare", "--methods", ","], "--methods"),
    (["adapters", "compare", "--methods", "nope"], "methods"),
    (["adapters", "compare", "--corpus", "{missing}"], "--corpus"),
    (["adapters", "compare", "--threads", "0"], "--threads"),
    (["adapters", "compare", "{bin_yaml}"], "junk.yaml"),
    # bench and list
    (["bench", "--tokens", "0"], "--tokens"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--routers", "nope"], "router"),
    (["bench", "--routers", "mixtral,switch", "--tokens", "1000", "--seq-len", "300"], "--tokens"),
    (["list", "--bogus"], "--bogus"),
]


def _row_id(row: tuple[list[str], str]) -> str:
    return " ".join(a.strip("{}") if a else "''" for a in row[0])


@pytest.mark.parametrize("row", ROWS, ids=[_row_id(r) for r in ROWS])
def test_bad_input_is_one_error_line_and_writes_nothing(row, world, tmp_path, monkeypatch):
    args, names = row
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path / "cache"))
    paths = {k: str(v) for k, v in world.items()}
    argv = [a.format(**paths) for a in args]
    before_world, before_cwd = tree(world["root"]), tree(tmp_path)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (argv, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert names in lines[0], (names, lines[0])
    assert result.stdout == ""
    assert tree(tmp_path) == before_cwd
    assert tree(world["root"]) == before_world


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the mount-namespace test")
def test_read_only_output_folder(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = runner.invoke(app, ["trace", str(world["ckpt"]), "--out", str(locked / "t.trace"),
                                     "--cache-dir", str(world["cache"])])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "cannot write" in result.stderr and list(locked.iterdir()) == []


def test_error_line_is_not_wrapped(world, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    long_name = tmp_path / ("a-very-long-folder-name-" * 6) / "missing.trace"
    result = runner.invoke(app, ["analyze", str(long_name)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and str(long_name) in result.stderr


def test_list_verbose_prints_every_option_uncut():
    from routelab import list_routers, preset_info

    result = runner.invoke(app, ["list", "-v"])  # not a terminal, as when piped
    assert result.exit_code == 0
    for name in (entry["name"] for entry in list_routers()):
        options = preset_info(name).options()
        line = next(li for li in result.stdout.splitlines() if li.startswith(f"{name}: "))
        block = result.stdout.split(line, 1)[1].split("\n\n", 1)[0]
        for key, value in options.items():
            assert f"{key}={value!r}" in block, (name, key)
    assert "…" not in result.stdout


def test_resume_refuses_a_damaged_metrics_line(world, tmp_path):
    from routelab.core.errors import InputError
    from routelab.lab.train import read_metrics

    rows = [{"kind": "train", "step": i} for i in range(1, 5)]
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + '\n{"kind": "tra')  # a cut last line: a kill while appending
    assert read_metrics(path) == rows
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_metrics(path)
