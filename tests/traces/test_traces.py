"""Trace format: exact write/read round trips, streaming, selections, resume and corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.toy_moe import ToyMoELM, single_thread

import routelab
from routelab.core.errors import ConfigError, InputError
from routelab.core.context import TokenBatch
from routelab.traces import InMemoryTrace, Trace, TraceRecorder, TraceWriter, sequence_offsets


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def random_rows(rng: np.random.Generator, n: int, k: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.stack([rng.permutation(num_experts)[:k] for _ in range(n)]) if n else np.zeros((0, k), np.int64)
    idx[rng.random(idx.shape) < 0.1] = -1
    weight = rng.random(idx.shape).astype(np.float32)
    weight[idx < 0] = 0
    return idx, weight


def write_random_trace(path, rng, *, num_layers=3, num_experts=7, calls=((5, 2), (3, 4), (6, 1)), **kwargs):
    """Write calls of (T, K) and return the expected padded arrays per layer and token columns."""
    expected = {layer: [] for layer in range(num_layers)}
    tokens = []
    seq = 0
    with TraceWriter(path, {"model": "unit", "domain_names": ["prose"]}, num_layers, num_experts, **kwargs) as w:
        for n, k in calls:
            token_ids = rng.integers(0, 1000, n)
            seq_ids = np.full(n, seq)
            positions = np.arange(n)
            domains = ["prose" if seq % 2 == 0 else "code"] * n
            seq += 1
            for layer in range(num_layers):
                idx, weight = random_rows(rng, n, k, num_experts)
                expected[layer].append((idx, weight))
                given = torch.from_numpy(idx) if layer == 0 else idx
                w.add(layer, given, weight, token_ids, seq_ids, positions, domains)
            tokens.append((token_ids, seq_ids, positions, domains))
    k_max = max(k for _, k in calls)
    padded = {}
    for layer, parts in expected.items():
        idx = np.concatenate([np.pad(i, ((0, 0), (0, k_max - i.shape[1])), constant_values=-1) for i, _ in parts])
        weight = np.concatenate([np.pad(wt, ((0, 0), (0, k_max - wt.shape[1]))) for _, wt in parts])
        padded[layer] = (idx, weight)
    return padded, tokens


@pytest.mark.parametrize("row_group_tokens,shard_tokens", [(1 << 16, 1 << 18), (2, 5), (1, 1)])
def test_round_trip_is_exact_with_variable_k(tmp_path, row_group_tokens, shard_tokens):
    rng = np.random.default_rng(0)
    path = tmp_path / "r.trace"
    expected, tokens = write_random_trace(path, rng, row_group_tokens=row_group_tokens, shard_tokens=shard_tokens)
    trace = routelab.Trace.open(path)
    assert (trace.num_layers, trace.num_experts, trace.k_max, trace.num_tokens) == (3, 7, 4, 14)
    assert trace.metadata["model"] == "unit" and trace.metadata["routelab_version"] == routelab.__version__
    assert trace.domain_names == ["prose", "code"]
    for layer in range(3):
        got = trace.layer(layer)
        np.testing.assert_array_equal(got.topk_idx, expected[layer][0])
        np.testing.assert_array_equal(got.topk_weight, expected[layer][1])  # bit-exact float32
        assert got.topk_idx.dtype == np.int32 and got.topk_weight.dtype == np.float32
    table = trace.tokens()
    np.testing.assert_array_equal(table.token_id, np.concatenate([t[0] for t in tokens]))
    np.testing.assert_array_equal(table.seq_id, np.repeat([0, 1, 2], [5, 3, 6]))
    np.testing.assert_array_equal(table.position, np.concatenate([np.arange(5), np.arange(3), np.arange(6)]))
    np.testing.assert_array_equal(table.domain, np.repeat([0, 1, 0], [5, 3, 6]))
    # Chunked reading yields the same rows.
    chunks = list(trace.iter_chunks())
    np.testing.assert_array_equal(np.concatenate([c.topk_idx_LTK for c in chunks], axis=1)[2], expected[2][0])
    seqs = list(trace.iter_sequences(layers=[1]))
    assert [c.num_tokens for c in seqs] == [5, 3, 6]
    np.testing.assert_array_equal(seqs[2].topk_weight_LTK[0], expected[1][1][8:])


def test_select_by_layer_domain_and_sequence(tmp_path):
    rng = np.random.default_rng(1)
    expected, _ = write_random_trace(tmp_path / "s.trace", rng, row_group_tokens=4)
    trace = Trace.open(tmp_path / "s.trace")
    prose = trace.select(domain="prose", layers=[2, 0])
    assert prose.layers == (2, 0) and prose.num_tokens == 11
    rows = np.r_[0:5, 8:14]
    np.testing.assert_array_equal(prose.layer(0).topk_idx, expected[0][0][rows])
    chunked = np.concatenate([c.topk_idx_LTK[0] for c in prose.iter_chunks()])
    np.testing.assert_array_equal(chunked, expected[2][0][rows])
    np.testing.assert_array_equal(prose.sequence_offsets(), [0, 5, 11])
    code = prose.select(sequences=[1])
    assert code.num_tokens == 0
    one = trace.select(sequences=[1], max_tokens=6)
    np.testing.assert_array_equal(one.layer(1).topk_weight, expected[1][1][5:6])
    with pytest.raises(ConfigError, match="layer=1"):
        prose.layer(1)
    with pytest.raises(ConfigError, match="Did you mean 'prose'"):
        trace.select(domain="pros")


def test_recorder_matches_direct_routing_with_padding(tmp_path):
    model = ToyMoELM(num_layers=3, num_experts=6, top_k=2)
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    with TraceWriter(tmp_path / "m.trace", {"model": "toy"}, 3, 6) as writer:
        recorder = TraceRecorder(model, writer)
        assert recorder.record(ids, mask, domains_B=["a", "b", "a"]) == 6 + 8 + 3
        assert recorder.record(ids[:1]) == 8
    trace = Trace.open(tmp_path / "m.trace")
    batch = TokenBatch.from_mask(3, 8, mask)
    table = trace.tokens()
    np.testing.assert_array_equal(table.seq_id, np.r_[[0] * 6, [1] * 8, [2] * 3, [3] * 8])
    np.testing.assert_array_equal(table.position[:17], batch.position_T.numpy())
    np.testing.assert_array_equal(table.token_id[:17], ids[mask].numpy())
    assert trace.domain_names == ["a", "b"] and list(table.domain[15:19]) == [0, 0, -1, -1]
    # Same routing as calling the model's MoE layers directly.
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, out: captured.append(out.routing)) for b in model.blocks]
    with torch.no_grad():
        model(ids, padding_mask=mask)
    for h in hooks:
        h.remove()
    for layer, routing in enumerate(captured):
        np.testing.assert_array_equal(trace.layer(layer).topk_idx[:17], routing.topk_idx.numpy())
        np.testing.assert_array_equal(trace.layer(layer).topk_weight[:17], routing.topk_weight.numpy())


def test_streaming_keeps_memory_bounded(tmp_path):
    """Rows are written once every layer delivered them; nothing accumulates beyond a row group."""
    writer = TraceWriter(tmp_path / "big.trace", None, 2, 4, row_group_tokens=100, shard_tokens=300)
    rng = np.random.default_rng(0)
    for step in range(20):
        for layer in range(2):
            idx, weight = random_rows(rng, 50, 2, 4)
            writer.add(layer, idx, weight, np.arange(50), np.full(50, step), np.arange(50))
        assert writer._token_queue.rows < 100
    writer.close()
    trace = Trace.open(tmp_path / "big.trace")
    assert trace.num_tokens == 1000 and len(list(trace.path.glob("part-*.parquet"))) == 4
    assert sum(c.num_tokens for c in trace.iter_chunks()) == 1000


def test_truncated_shard_gives_clear_error(tmp_path):
    write_random_trace(tmp_path / "t.trace", np.random.default_rng(2), shard_tokens=6)
    shard = tmp_path / "t.trace" / "part-000001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"part-000001\.parquet is truncated or corrupt"):
        Trace.open(tmp_path / "t.trace")


def test_corrupt_page_gives_clear_error(tmp_path):
    write_random_trace(tmp_path / "c.trace", np.random.default_rng(3), calls=((400, 3),))
    shard = tmp_path / "c.trace" / "part-000000.parquet"
    data = bytearray(shard.read_bytes())
    for offset in range(8, len(data) // 2, 7):  # scribble over column data, keep the footer
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    trace = Trace.open(tmp_path / "c.trace")
    with pytest.raises(InputError, match=r"part-000000\.parquet is corrupt"):
        for layer in trace.layers:
            trace.layer(layer)
        trace.tokens()


def test_missing_or_bad_header_and_missing_shard(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Trace.open(tmp_path / "nope.trace")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="trace.json is missing"):
        Trace.open(tmp_path / "empty")
    write_random_trace(tmp_path / "h.trace", np.random.default_rng(4), shard_tokens=6)
    header = tmp_path / "h.trace" / "trace.json"
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="trace.json is not valid JSON"):
        Trace.open(tmp_path / "h.trace")
    header.write_text(text)
    (tmp_path / "h.trace" / "part-000002.parquet").unlink()
    with pytest.raises(InputError, match="part-000002.parquet listed in .* is missing"):
        Trace.open(tmp_path / "h.trace")


def test_interrupted_writer_keeps_last_commit_and_resumes(tmp_path):
    path = tmp_path / "i.trace"
    rng = np.random.default_rng(5)
    rows = [random_rows(rng, 4, 2, 5) for _ in range(6)]

    def add(writer, step):
        for layer in range(2):
            writer.add(layer, *rows[step], np.arange(4), np.full(4, step), np.arange(4))

    with pytest.raises(RuntimeError):
        with TraceWriter(path, {"model": "x"}, 2, 5, row_group_tokens=3) as writer:
            for step in range(4):
                add(writer, step)
                if step == 1:
                    writer.commit({"steps_done": 2})
            raise RuntimeError("killed")
    with pytest.raises(InputError, match="incomplete"):
        Trace.open(path)
    assert Trace.open(path, allow_incomplete=True).num_tokens == 8
    writer = TraceWriter.resume(path)
    assert writer.resume_state == {"steps_done": 2} and writer.num_tokens == 8
    for step in range(2, 6):
        add(writer, step)
    writer.close()
    trace = Trace.open(path)
    np.testing.assert_array_equal(trace.layer(1).topk_idx, np.concatenate([r[0] for r in rows]))
    np.testing.assert_array_equal(trace.tokens().seq_id, np.repeat(np.arange(6), 4))
    with pytest.raises(ConfigError, match="nothing to resume"):
        TraceWriter.resume(path)


def test_writer_rejects_bad_input(tmp_path):
    writer = TraceWriter(tmp_path / "w.trace", None, 2, 4)
    ok = (np.arange(3), np.zeros(3, np.int64), np.arange(3))
    with pytest.raises(InputError, match="layer must be an int in \\[0, 2\\)"):
        writer.add(2, np.zeros((3, 1), np.int64), np.zeros((3, 1)), *ok)
    with pytest.raises(InputError, match="valid ids are 0..3"):
        writer.add(0, np.full((3, 1), 4), np.zeros((3, 1)), *ok)
    with pytest.raises(InputError, match="NaN/Inf"):
        writer.add(0, np.zeros((3, 1), np.int64), np.full((3, 1), np.nan), *ok)
    with pytest.raises(InputError, match="positions_T must have shape \\[3\\]"):
        writer.add(0, np.zeros((3, 1), np.int64), np.zeros((3, 1)), np.arange(3), np.zeros(3, np.int64), np.arange(2))
    with pytest.raises(InputError, match="integers"):
        writer.add(0, np.zeros((3, 1)), np.zeros((3, 1)), *ok)
    writer.add(0, np.zeros((3, 1), np.int64), np.zeros((3, 1)), *ok)
    with pytest.raises(InputError, match="another layer gave"):
        writer.add(1, np.zeros((3, 1), np.int64), np.zeros((3, 1)), np.arange(3) + 1, ok[1], ok[2])
    with pytest.raises(InputError, match="row counts differ"):
        writer.close()
    with pytest.raises(ConfigError, match="is in use by pid"):  # the open writer holds its folder
        TraceWriter(tmp_path / "w.trace", None, 2, 4)
    writer.abort()
    with TraceWriter(tmp_path / "done.trace", None, 2, 4) as done:
        done.add(0, np.zeros((3, 1), np.int64), np.zeros((3, 1)), *ok)
        done.add(1, np.zeros((3, 1), np.int64), np.zeros((3, 1)), *ok)
    with pytest.raises(ConfigError, match="already exists"):
        TraceWriter(tmp_path / "done.trace", None, 2, 4)
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        TraceWriter(tmp_path / "j.trace", {"bad": object()}, 2, 4)


def test_sequence_offsets():
    np.testing.assert_array_equal(sequence_offsets(np.array([3, 3, 1, 1, 1, 3])), [0, 2, 5, 6])
    np.testing.assert_array_equal(sequence_offsets(np.array([], dtype=np.int64)), [0])


def test_empty_trace_round_trip(tmp_path):
    with TraceWriter(tmp_path / "e.trace", None, 1, 3):
        pass
    trace = Trace.open(tmp_path / "e.trace")
    assert trace.num_tokens == 0 and trace.layer(0).topk_idx.shape == (0, 0)
    assert json.loads((tmp_path / "e.trace" / "trace.json").read_text())["complete"] is True


def test_in_memory_select_is_the_file_traces_select(tmp_path):
    rng = np.random.default_rng(1)
    write_random_trace(tmp_path / "s.trace", rng, row_group_tokens=4)
    trace = Trace.open(tmp_path / "s.trace")
    memory = InMemoryTrace.load(trace)
    for kwargs in ({"domain": "prose", "layers": [2, 0]}, {"sequences": [1], "max_tokens": 6}, {"domain": [0, 1]},
                   {"domain": -1}):
        a, b = trace.select(**kwargs), memory.select(**kwargs)
        assert a.layers == b.layers and a.num_tokens == b.num_tokens
        for layer in a.layers:
            np.testing.assert_array_equal(a.layer(layer).topk_idx, b.layer(layer).topk_idx)
    for kwargs, message in (({"domain": "pros"}, "Did you mean 'prose'"), ({"domain": 7}, "out of range"),
                            ({"layers": []}, "at least one layer"), ({"layers": [9]}, "layer=9")):
        for view in (trace, memory):
            with pytest.raises(ConfigError, match=message):
                view.select(**kwargs)
