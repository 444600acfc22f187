"""Routing traces of tiny transformers MoE models: a recorded trace equals the routers' own top-k.

The reference is each router module called directly on the hidden states it received
(captured by a forward pre-hook), restricted to the real tokens: the trace must hold
exactly those expert ids, in the same order, for plain forwards and for ``generate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.metrics import layer_balance, segment_cache_hit_rates
from routelab.models.hf import HFRoutingSource, attach, domain_experts, open_writer, record, risk_difference
from routelab.traces import Trace, TraceRecorder
from tests.hf_tiny import ARCH_NAMES, tiny_batch, tiny_model

pytest.importorskip("transformers")


def routers(model):
    out = []
    for layer in model.model.layers:
        mlp = layer.mlp
        out.append(mlp.router if hasattr(mlp, "router") else mlp.gate)
    return out


class RouterInputs:
    """Captures what every router receives; ``own_topk(l)`` calls the router on it again."""

    def __init__(self, model):
        self.inputs = {i: [] for i in range(len(model.model.layers))}
        self.modules = routers(model)
        self.hooks = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, layer):
        def hook(module, args):
            self.inputs[layer].append(args[0].detach().clone())
        return hook

    def own_topk(self, layer, call):
        with torch.no_grad():
            return type(self.modules[layer]).forward(self.modules[layer], self.inputs[layer][call])[2]

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_trace_of_forward_and_generate_equals_the_routers_own_topk(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    spy = RouterInputs(model)
    with attach(model) as handle:
        writer = open_writer(handle, tmp_path / "run.trace")
        with record(handle, writer, domain="prompt"):
            with torch.no_grad():
                model(ids, attention_mask=mask)
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        writer.close()
    spy.remove()
    trace = Trace.open(tmp_path / "run.trace")
    real = mask.reshape(-1).bool()
    assert trace.num_layers == 2 and trace.metadata["model_layers"] == [0, 1]
    assert trace.metadata["architecture"] == arch
    for layer in range(2):
        expected = [spy.own_topk(layer, 0)[real]]  # the plain forward
        expected.append(spy.own_topk(layer, 1)[real])  # generate: prefill
        for step in (2, 3):  # generate: two decoding steps of one token per sequence
            expected.append(spy.own_topk(layer, step))
        assert np.array_equal(trace.topk_idx(layer), torch.cat(expected).numpy())
    tokens = trace.tokens()
    assert trace.num_tokens == 15 + 15 + 2 + 2
    assert tokens.seq_id.tolist() == [0] * 9 + [1] * 6 + [2] * 9 + [3] * 6 + [2, 3, 2, 3]
    assert tokens.position.tolist()[-4:] == [9, 6, 10, 7]  # the cached past counts
    assert tokens.token_id.tolist()[-4:] == [generated[0, 9], generated[1, 9], generated[0, 10], generated[1, 10]]
    assert set(tokens.domain.tolist()) == {0} and trace.domain_names == ["prompt"]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_routing_source_drives_the_trace_recorder(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    spy = RouterInputs(model)
    with attach(model) as handle:
        with open_writer(handle, tmp_path / "src.trace") as writer:
            TraceRecorder(HFRoutingSource(handle), writer).record(ids, mask.bool(), domains_B=["a", "b"])
        stats = handle.routing_stats()
    spy.remove()
    trace = Trace.open(tmp_path / "src.trace")
    real = mask.reshape(-1).bool()
    for layer in range(2):
        assert np.array_equal(trace.topk_idx(layer), spy.own_topk(layer, 0)[real].numpy())
    report = layer_balance(trace)  # routelab.metrics reads the trace unchanged
    assert report.loads.tolist() == [stats["layer_0"]["load"], stats["layer_1"]["load"]]
    curves = segment_cache_hit_rates(trace, future_lens=(4,), baselines=("lru",), sequence_stride=1)
    assert all(curve.hit_rate[-1] == 1.0 for curve in curves)  # a cache of every expert always hits


def test_replacement_routers_record_their_empty_slots(tmp_path):
    model = tiny_model("qwen3_moe")
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        handle.replace_router("expert-choice", layers=[1])
        with open_writer(handle, tmp_path / "ec.trace") as writer, record(handle, writer):
            with torch.no_grad():
                model(ids, attention_mask=mask)
            own = handle.current_router(1).last_routing.topk_idx
    trace = Trace.open(tmp_path / "ec.trace")
    recorded = trace.topk_idx(1)
    assert (recorded == -1).any()
    assert np.array_equal(recorded[:, : own.shape[1]], own.numpy())


def test_domain_experts_from_a_trace_match_the_risk_difference(tmp_path):
    model = tiny_model("qwen2_moe", mlp_only_layers=[0])  # one MoE layer, at decoder layer 1
    math_ids = torch.randint(3, 40, (3, 10), generator=torch.Generator().manual_seed(7))
    prose_ids = torch.randint(40, 96, (3, 10), generator=torch.Generator().manual_seed(8))
    with attach(model) as handle:
        assert handle.moe_layers == [1]
        with open_writer(handle, tmp_path / "dom.trace") as writer:
            observer = record(handle, writer, domain="math")
            with torch.no_grad():
                model(math_ids)
                observer.domain = "prose"
                model(prose_ids)
            observer.stop()
    trace = Trace.open(tmp_path / "dom.trace")
    idx = trace.topk_idx(0)
    delta = risk_difference(idx[:30], idx[30:], trace.num_experts)
    expected = sorted(range(trace.num_experts), key=lambda e: (-delta[e], e))[:2]
    assert domain_experts(trace, "math", top_n=2) == {1: expected}
    assert domain_experts(trace, "math", reference="prose", top_n=1) == {1: expected[:1]}
    with pytest.raises(ConfigError, match="not in the trace"):
        domain_experts(trace, "code")


def test_writer_shape_must_match_the_model(tmp_path):
    from routelab.traces import TraceWriter

    with attach(tiny_model("mixtral")) as handle:
        writer = TraceWriter(tmp_path / "bad.trace", {}, num_layers=3, num_experts=4)
        with pytest.raises(ConfigError, match="open_writer"):
            record(handle, writer)
