"""`routelab trace`, `analyze` and `simulate` end to end on a toy model and a tiny corpus."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from tests.toy_moe import ToyMoELM, single_thread
from typer.testing import CliRunner

from routelab.cli import app
from routelab.core.errors import ConfigError
from routelab.traces import Trace, TraceRecorder, TraceWriter
from routelab.traces.corpus import batches, parse_corpus, record_corpus, token_sequences

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


class ByteTokenizer:
    """ids = UTF-8 bytes modulo the vocabulary (an object whose encode() has .ids, like tokenizers)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(ids=[b % self.vocab_size for b in text.encode()])

    def to_str(self) -> str:
        return f"bytes-mod-{self.vocab_size}"


@pytest.fixture
def corpus(tmp_path):
    drama = tmp_path / "drama"
    drama.mkdir()
    (drama / "a.txt").write_text("To be, or not to be, that is the question. " * 3)
    (drama / "b.txt").write_text("Friends, Romans, countrymen, lend me your ears.")
    (drama / "binary.bin").write_bytes(b"\x00\x01\x02")
    code = tmp_path / "code.py"
    code.write_text("def f(x):\n    return x * 2\n" * 4)
    return tmp_path, [f"drama={drama}", str(code)]


@pytest.fixture
def fake_lab(monkeypatch):
    model = ToyMoELM(vocab_size=64, num_layers=2, num_experts=4, top_k=2)
    checkpoint = types.ModuleType("routelab.lab.checkpoint")
    checkpoint.load_model = lambda path: (model, ByteTokenizer(64), {"name": "toy", "router": "mixtral"})
    monkeypatch.setitem(sys.modules, "routelab.lab", types.ModuleType("routelab.lab"))
    monkeypatch.setitem(sys.modules, "routelab.lab.checkpoint", checkpoint)
    return model


def test_corpus_parsing_and_sequences(corpus):
    root, specs = corpus
    entries = parse_corpus(specs)
    assert [e.domain for e in entries] == ["drama", "code"]
    seqs = list(token_sequences(entries, lambda text: list(text.encode()), 40))
    assert all(len(ids) <= 40 for _, ids in seqs) and {d for d, _ in seqs} == {"drama", "code"}
    ids, mask, domains = next(batches(iter([("a", [1, 2, 3]), ("b", [4])]), 2))
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.sum().item() == 4 and domains == ["a", "b"]
    with pytest.raises(ConfigError, match="does not exist"):
        parse_corpus([str(root / "missing")])


def test_record_corpus_resumes_after_interruption(tmp_path, corpus):
    _, specs = corpus
    model = ToyMoELM(vocab_size=64, num_layers=2, num_experts=4, top_k=2)
    encode = lambda t: [b % 64 for b in t.encode()]  # noqa: E731
    seqs = lambda: token_sequences(parse_corpus(specs), encode, 16)  # noqa: E731
    full_path, part_path = tmp_path / "full.trace", tmp_path / "part.trace"
    with TraceWriter(full_path, {}, 2, 4) as w:
        total = record_corpus(TraceRecorder(model, w), seqs(), batch_size=3, commit_every=2)

    class Stop(Exception):
        pass

    calls = []

    def stop_after_three(n):
        calls.append(n)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        with TraceWriter(part_path, {}, 2, 4) as w:
            record_corpus(TraceRecorder(model, w), seqs(), batch_size=3, commit_every=2, on_batch=stop_after_three)
    writer = TraceWriter.resume(part_path)
    assert writer.resume_state["batches_done"] == 2
    with writer:
        record_corpus(TraceRecorder(model, writer), seqs(), batch_size=3, commit_every=2)
    full, part = Trace.open(full_path), Trace.open(part_path)
    assert part.num_tokens == full.num_tokens == total
    for layer in (0, 1):
        np.testing.assert_array_equal(part.layer(layer).topk_idx, full.layer(layer).topk_idx)
    np.testing.assert_array_equal(part.tokens().seq_id, full.tokens().seq_id)


def test_trace_command_end_to_end(tmp_path, corpus, fake_lab):
    _, specs = corpus
    out = tmp_path / "toy.trace"
    args = ["trace", str(tmp_path / "ckpt.pt"), "--out", str(out), "--seq-len", "32", "--batch-size", "2"]
    for spec in specs:
        args += ["--corpus", spec]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    trace = Trace.open(out)
    assert trace.metadata["model"] == "toy" and trace.metadata["router"] == "mixtral"
    assert trace.metadata["tokenizer_hash"] and trace.domain_names == ["drama", "code"]
    assert trace.num_layers == 2 and trace.num_experts == 4 and trace.k_max == 2
    texts = ("To be, or not to be, that is the question. " * 3, "Friends, Romans, countrymen, lend me your ears.",
             "def f(x):\n    return x * 2\n" * 4)
    assert trace.num_tokens == sum(len(t.encode()) for t in texts)
    # The first sequence's routing equals a direct forward of the model on it.
    first = torch.tensor([[b % 64 for b in texts[0].encode()[:32]]])
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, o: captured.append(o.routing.topk_idx)) for b in fake_lab.blocks]
    with torch.no_grad():
        fake_lab(first)
    for h in hooks:
        h.remove()
    np.testing.assert_array_equal(trace.layer(1).topk_idx[:32], captured[1].numpy())
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    limited = runner.invoke(app, [*args, "--overwrite", "--max-tokens", "40", "--seq-len", "20"])
    assert limited.exit_code == 0 and Trace.open(out).num_tokens == 40


def test_trace_command_without_lab_explains(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "routelab.lab.checkpoint", None)
    _, specs = corpus
    result = runner.invoke(app, ["trace", "x.pt", "--corpus", specs[1], "--out", str(tmp_path / "t.trace")])
    assert result.exit_code == 2 and "routelab.lab.checkpoint" in result.output


@pytest.fixture
def skewed_trace(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.trace"
    with TraceWriter(path, {"model": "synthetic"}, 2, 8) as w:
        for seq in range(24):
            domain = "drama" if seq % 2 else "code"
            n = 64
            favourite = np.array([0, 1]) if domain == "drama" else np.array([5, 6])
            token_ids = rng.integers(0, 100, n)
            for layer in range(2):
                idx = np.stack([favourite if rng.random() < 0.6 else rng.permutation(8)[:2] for _ in range(n)])
                w.add(layer, idx, np.full(idx.shape, 0.5, np.float32), token_ids, np.full(n, seq), np.arange(n), domain)
    return path


def test_analyze_writes_report_plots_and_json(tmp_path, skewed_trace):
    out = tmp_path / "report"
    result = runner.invoke(app, ["analyze", str(skewed_trace), "--out", str(out), "--windows", "4,16",
                                 "--sequence-stride", "2", "--devices", "4"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for section in ("## Load balance", "## Local routing consistency", "## Expert offloading",
                    "## Domain specialisation", "## Expert parallelism", "## Batch scheduling", "## Serving summary"):
        assert section in report
    plots = ("load_heatmap.png", "srp.png", "sch_curves.png", "cache_hit_rate.png", "domain_divergence.png",
             "ep_device_load.png")
    for plot in plots:
        assert (out / plot).stat().st_size > 1000 and plot in report
    data = json.loads((out / "analysis.json").read_text())
    assert data["tokens"] == 24 * 64 and data["serving_summary"]["cache_size"] == 4
    assert data["domains"]["jsd_ln2"]["0"][0][1] > 0.1  # the two domains route differently


def test_simulate_commands(tmp_path, skewed_trace):
    cache = runner.invoke(app, ["simulate", "cache", str(skewed_trace), "--sizes", "2,4", "--prefetch",
                                "--json", str(tmp_path / "c.json")])
    assert cache.exit_code == 0, cache.output
    rows = json.loads((tmp_path / "c.json").read_text())
    assert {r["policy"] for r in rows} == {"lru", "lfu", "belady", "prefetch-lru"}
    assert "predictor recall" in cache.output
    ep = runner.invoke(app, ["simulate", "ep", str(skewed_trace), "--devices", "4", "--batch-tokens", "256",
                             "--min-chunk", "8"])
    assert ep.exit_code == 0 and "LLEP speed-up" in ep.output
    schedule = runner.invoke(app, ["simulate", "schedule", str(skewed_trace), "--batch-size", "4"])
    assert schedule.exit_code == 0 and "fewer" in schedule.output
    bad = runner.invoke(app, ["simulate", "cache", str(skewed_trace), "--sizes", "99"])
    assert bad.exit_code == 2 and "exceeds num_experts" in bad.output
    missing = runner.invoke(app, ["analyze", str(tmp_path / "nope.trace")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_analyze_refuses_a_folder_another_process_writes(tmp_path, skewed_trace):
    from routelab.core.run_lock import FolderLock

    out = tmp_path / "report"
    with FolderLock(out, "analysis folder"):  # a second open file description: refused like another process
        result = runner.invoke(app, ["analyze", str(skewed_trace), "--out", str(out), "--no-prefetch"])
    assert result.exit_code == 2 and "is in use by pid" in result.output
    assert not (out / "report.md").exists()
