"""`routelab simulate cache` sizes experts from the trace when it can, and says which size it used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from routelab.cli import app
from routelab.moe.experts import BatchedExperts
from routelab.systems.expert_size import MIXTRAL_EXPERT_BYTES, expert_size_metadata, resolve_expert_size
from routelab.traces import TraceWriter

runner = CliRunner()


def write_trace(path, metadata):
    rng = np.random.default_rng(0)
    with TraceWriter(path, {"model": "synthetic", **metadata}, 1, 4) as w:
        idx = np.stack([rng.permutation(4)[:2] for _ in range(32)])
        w.add(0, idx, np.full(idx.shape, 0.5, np.float32), np.arange(32), np.zeros(32, int), np.arange(32), "d")
    return path


def test_expert_size_metadata_of_swiglu_experts():
    experts = BatchedExperts(num_experts=4, d_model=8, d_hidden=16)
    meta = expert_size_metadata(experts, 4)
    assert meta == {"expert_parameters": 3 * 8 * 16, "expert_dtype": "float32", "expert_bytes": 3 * 8 * 16 * 4}


def test_resolution_order_explicit_then_trace_then_model_config_then_mixtral():
    recorded = {"expert_parameters": 10, "expert_dtype": "bfloat16", "expert_bytes": 20}
    assert resolve_expert_size(1.5, recorded).bytes == 1.5e6
    assert resolve_expert_size(None, recorded).bytes == 20
    config = {"model_config": {"d_model": 8, "expert_d_hidden": 16, "activation": "gelu"}}
    assert resolve_expert_size(None, config).bytes == 2 * 8 * 16 * 4
    fallback = resolve_expert_size(None, {})
    assert fallback.bytes == MIXTRAL_EXPERT_BYTES and "set --expert-mb" in fallback.source


@pytest.mark.parametrize("metadata, expected_bytes, says", [
    ({"expert_parameters": 1000, "expert_dtype": "bfloat16", "expert_bytes": 2000}, 2000, "trace metadata"),
    ({}, MIXTRAL_EXPERT_BYTES, "Mixtral"),
])
def test_simulate_cache_uses_and_prints_the_expert_size(tmp_path, metadata, expected_bytes, says):
    trace = write_trace(tmp_path / "t.trace", metadata)
    out = runner.invoke(app, ["simulate", "cache", str(trace), "--sizes", "2", "--policies", "lru",
                              "--json", str(tmp_path / "c.json")])
    assert out.exit_code == 0, out.output
    assert "expert size" in out.output and says in out.output
    row = json.loads((tmp_path / "c.json").read_text())[0]
    assert row["bytes_moved"] == pytest.approx(row["demand_loads"] * expected_bytes)


def test_traces_of_transformers_models_record_their_expert_size():
    pytest.importorskip("transformers")
    from routelab.hf import attach
    from routelab.models.hf.recording import trace_metadata
    from tests.hf_tiny import tiny_model

    model = tiny_model("mixtral")  # 4 experts, hidden 16, intermediate 32, SwiGLU, fp32
    with attach(model) as handle:
        meta = trace_metadata(handle)
    assert meta["expert_parameters"] == 3 * 16 * 32 and meta["expert_dtype"] == "float32"
    assert meta["expert_bytes"] == 3 * 16 * 32 * 4
