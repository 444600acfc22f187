"""``routelab trace-hf`` on a tiny checkpoint saved with save_pretrained and loaded back offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routelab.cli import app
from routelab.models.hf import HFRoutingSource, attach
from routelab.models.hf.loading import load_pretrained
from routelab.traces import Trace
from tests.hf_tiny import tiny_model

pytest.importorskip("transformers")

TEXT = {
    "drama": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 6,
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 6,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("ckpt")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(TEXT.values()), vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, text in TEXT.items():
        (root / f"{name}.txt").write_text(text)
    return root


def test_trace_hf_loads_with_from_pretrained_and_traces_every_domain(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "olmoe.trace"
    result = CliRunner().invoke(app, [
        "trace-hf", str(checkpoint / "model"), "--corpus", f"drama={checkpoint / 'drama.txt'}",
        "--corpus", str(checkpoint / "code.txt"), "--out", str(out), "--seq-len", "32", "--batch-size", "3",
    ])
    assert result.exit_code == 0, result.output
    assert "MaxVio" in result.output
    analysis = CliRunner().invoke(app, ["analyze", str(out), "--out", str(tmp_path / "report")])
    assert analysis.exit_code == 0, analysis.output  # `routelab analyze` reads it unchanged
    assert (tmp_path / "report" / "report.md").exists()
    trace = Trace.open(out)
    assert trace.complete and trace.domain_names == ["drama", "code"]
    assert trace.metadata["architecture"] == "olmoe"
    # the same routing as the model loaded back and traced directly
    model = load_pretrained(str(checkpoint / "model"))
    tokens = trace.tokens()
    offsets = trace.sequence_offsets()
    with attach(model) as handle:
        source = HFRoutingSource(handle)
        for s in range(len(offsets) - 1):
            ids = torch.tensor(tokens.token_id[offsets[s]:offsets[s + 1]]).unsqueeze(0)
            routes = source.route(ids, None)
            for layer in range(trace.num_layers):
                assert np.array_equal(trace.topk_idx(layer)[offsets[s]:offsets[s + 1]], routes[layer].topk_idx_TK.numpy())


def test_trace_hf_resumes_after_an_interruption(checkpoint, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in TEXT.items():
        (corpus / f"{name}.txt").write_text(text)
    args = ["trace", "--hf", str(checkpoint / "model"), "--corpus", str(corpus), "--seq-len", "16",
            "--batch-size", "2"]
    full = tmp_path / "full.trace"
    assert CliRunner().invoke(app, [*args, "--out", str(full)]).exit_code == 0

    assert Trace.open(full).metadata["architecture"] == "olmoe"
    calls = {"n": 0}
    route = HFRoutingSource.route

    def flaky(self, ids, mask):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return route(self, ids, mask)

    import routelab.commands.hf as command

    monkeypatch.setattr(HFRoutingSource, "route", flaky)
    monkeypatch.setattr(command, "run_trace_hf", _with_commit_every(command.run_trace_hf, 4))
    part = tmp_path / "part.trace"
    assert CliRunner().invoke(app, [*args, "--out", str(part)]).exit_code != 0
    partial = Trace.open(part, allow_incomplete=True)
    assert not partial.complete and 0 < partial.num_tokens < Trace.open(full).num_tokens
    monkeypatch.setattr(HFRoutingSource, "route", route)
    result = CliRunner().invoke(app, [*args, "--out", str(part), "--resume"])
    assert result.exit_code == 0, result.output
    a, b = Trace.open(full), Trace.open(part)
    assert a.num_tokens == b.num_tokens
    assert np.array_equal(a.tokens().seq_id, b.tokens().seq_id)
    assert np.array_equal(a.tokens().token_id, b.tokens().token_id)
    for layer in range(a.num_layers):
        assert np.array_equal(a.topk_idx(layer), b.topk_idx(layer))
    again = CliRunner().invoke(app, [*args, "--out", str(part), "--resume"])
    assert again.exit_code == 2 and "complete" in again.output


def _with_commit_every(run, every):
    def wrapped(*args, **kwargs):
        kwargs["commit_every"] = every
        return run(*args, **kwargs)
    return wrapped


def test_trace_hf_errors_name_the_fix(checkpoint, tmp_path):
    import transformers as tf

    (tmp_path / "a.txt").write_text("some text")
    base = ["--corpus", str(tmp_path / "a.txt"), "--out", str(tmp_path / "x.trace")]
    missing = CliRunner().invoke(app, ["trace-hf", str(tmp_path / "nope"), *base])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    dense = tmp_path / "dense"
    config = tf.LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    tf.LlamaForCausalLM(config).save_pretrained(dense)
    tf.AutoTokenizer.from_pretrained(checkpoint / "model").save_pretrained(dense)
    result = CliRunner().invoke(app, ["trace", "--hf", str(dense), *base])
    assert result.exit_code == 2 and "not a supported MoE architecture" in result.output
