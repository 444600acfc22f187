"""The router's per-batch sparsity (torch, ``routelab.core.routing_sparsity``) equals the
trace metric (numpy, ``routelab.metrics.sparsity``) on the same routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.core.routing_sparsity import activity_mask, cls_of_mask, tls_of_mask
from routelab.metrics.sparsity import active_mask, chunk_level_sparsity, token_level_sparsity


@settings(max_examples=60)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    num_experts=st.integers(1, 6),
    top_k=st.integers(1, 3),
    window=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_torch_and_numpy_sparsity_agree(lengths, num_experts, top_k, window, seed) -> None:
    rng = np.random.default_rng(seed)
    num_tokens = sum(lengths)
    idx = rng.integers(-1, num_experts, size=(num_tokens, top_k))  # -1 = empty slot
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq_id = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(num_tokens) - np.repeat(offsets[:-1], lengths)
    mask_TE = activity_mask(torch.from_numpy(idx), num_experts)
    assert np.array_equal(mask_TE.numpy(), active_mask(idx, num_experts))
    assert float(tls_of_mask(mask_TE)) == pytest.approx(token_level_sparsity(idx, num_experts), abs=1e-6)
    cls = cls_of_mask(mask_TE, torch.from_numpy(seq_id), torch.from_numpy(position), window)
    assert float(cls) == pytest.approx(chunk_level_sparsity(idx, num_experts, offsets, window), abs=1e-6)
