"""``InMemoryTrace``: the read interface of ``Trace`` over numpy arrays (no file needed).

Every function of ``routelab.metrics`` and ``routelab.systems`` accepts either; build one
from routing you already hold (``InMemoryTrace.from_arrays``) or load a small trace fully
into memory (``InMemoryTrace.load(trace)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.traces.reader import LayerRouting, TokenTable, selected_layers, selected_rows, sequence_offsets


class TraceLike(Protocol):
    """What metrics read from a trace (``Trace`` and ``InMemoryTrace`` provide it)."""

    @property
    def num_experts(self) -> int: ...

    @property
    def k_max(self) -> int: ...

    @property
    def layers(self) -> tuple[int, ...]: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def domain_names(self) -> list[str]: ...

    @property
    def metadata(self) -> dict[str, Any]: ...

    def layer(self, layer: int) -> LayerRouting: ...

    def topk_idx(self, layer: int) -> np.ndarray: ...

    def tokens(self) -> TokenTable: ...

    def sequence_offsets(self) -> np.ndarray: ...


class InMemoryTrace:
    """A trace held in memory. ``topk_idx[l]`` is int ``[T, K]`` (-1 = empty) for each layer."""

    def __init__(
        self,
        topk_idx: Mapping[int, np.ndarray],
        topk_weight: Mapping[int, np.ndarray],
        tokens: TokenTable,
        num_experts: int,
        domain_names: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._idx = {int(layer): np.asarray(v) for layer, v in topk_idx.items()}
        self._weight = {int(layer): np.asarray(v) for layer, v in topk_weight.items()}
        self._tokens = tokens
        self._num_experts = int(num_experts)
        self._domain_names = list(domain_names)
        self._metadata = dict(metadata or {})

    @classmethod
    def from_arrays(
        cls,
        topk_idx: Sequence[np.ndarray] | Mapping[int, np.ndarray],
        num_experts: int,
        *,
        topk_weight: Sequence[np.ndarray] | Mapping[int, np.ndarray] | None = None,
        seq_id: np.ndarray | None = None,
        position: np.ndarray | None = None,
        token_id: np.ndarray | None = None,
        domain: np.ndarray | Sequence[str] | None = None,
        domain_names: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> InMemoryTrace:
        """Build a trace from per-layer ``[T, K]`` expert ids (all layers the same ``T``).

        ``seq_id`` defaults to one sequence; ``position`` to the index inside each run of
        equal ``seq_id``; ``domain`` may be names (mapped onto ``domain_names``) or codes.
        """
        idx_map = dict(topk_idx) if isinstance(topk_idx, Mapping) else dict(enumerate(topk_idx))
        if not idx_map:
            raise ConfigError("topk_idx must hold at least one layer.")
        arrays = {}
        num_tokens = None
        for layer, idx in idx_map.items():
            idx = np.asarray(idx)
            if idx.ndim == 1:
                idx = idx[:, None]
            if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
                raise InputError(
                    f"topk_idx of layer {layer} must be an integer [T, K] array, got {idx.dtype} {idx.shape}."
                )
            if num_tokens is None:
                num_tokens = idx.shape[0]
            elif idx.shape[0] != num_tokens:
                raise InputError(f"layer {layer} has {idx.shape[0]} tokens, layer 0 has {num_tokens}.")
            if idx.size and (idx.min() < -1 or idx.max() >= num_experts):
                raise InputError(f"layer {layer} holds expert ids outside [-1, {num_experts}).")
            arrays[int(layer)] = idx.astype(np.int32)
        k_max = max(a.shape[1] for a in arrays.values())
        arrays = {
            layer: np.pad(a, ((0, 0), (0, k_max - a.shape[1])), constant_values=-1) for layer, a in arrays.items()
        }
        if topk_weight is None:
            weights = {layer: (a >= 0).astype(np.float32) for layer, a in arrays.items()}
        else:
            w_map = dict(topk_weight) if isinstance(topk_weight, Mapping) else dict(enumerate(topk_weight))
            weights = {}
            for layer, a in arrays.items():
                w = np.asarray(w_map[layer], dtype=np.float32)
                w = w[:, None] if w.ndim == 1 else w
                weights[layer] = np.pad(w, ((0, 0), (0, k_max - w.shape[1])))
        seq = np.zeros(num_tokens, np.int64) if seq_id is None else np.asarray(seq_id, np.int64)
        if seq.shape != (num_tokens,):
            raise InputError(f"seq_id must have shape [{num_tokens}], got {seq.shape}.")
        if position is None:
            offsets = sequence_offsets(seq)
            position = np.arange(num_tokens) - np.repeat(offsets[:-1], np.diff(offsets))
        names = list(domain_names)
        if domain is None:
            codes = np.full(num_tokens, -1, np.int16)
        else:
            domain_arr = np.asarray(domain)
            if domain_arr.dtype.kind in "US":
                for name in np.unique(domain_arr):
                    if str(name) not in names:
                        names.append(str(name))
                codes = np.array([names.index(str(d)) for d in domain_arr], np.int16)
            else:
                codes = domain_arr.astype(np.int16)
        tok = np.full(num_tokens, -1, np.int64) if token_id is None else np.asarray(token_id, np.int64)
        tokens = TokenTable(tok, seq, np.asarray(position, np.int32), codes)
        return cls(arrays, weights, tokens, num_experts, names, metadata)

    @classmethod
    def load(cls, trace: TraceLike) -> InMemoryTrace:
        """Read every selected layer of ``trace`` into memory."""
        routing = {layer: trace.layer(layer) for layer in trace.layers}
        return cls(
            {layer: r.topk_idx for layer, r in routing.items()},
            {layer: r.topk_weight for layer, r in routing.items()},
            trace.tokens(),
            trace.num_experts,
            trace.domain_names,
            trace.metadata,
        )

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def k_max(self) -> int:
        return max((a.shape[1] for a in self._idx.values()), default=0)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self._idx)

    @property
    def num_layers(self) -> int:
        return len(self._idx)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def domain_names(self) -> list[str]:
        return list(self._domain_names)

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def _check_layer(self, layer: int) -> int:
        if layer not in self._idx:
            raise ConfigError(f"layer={layer!r} is not in this trace; available layers: {list(self._idx)}.")
        return layer

    def layer(self, layer: int) -> LayerRouting:
        layer = self._check_layer(layer)
        return LayerRouting(self._idx[layer], self._weight[layer])

    def topk_idx(self, layer: int) -> np.ndarray:
        return self.layer(layer).topk_idx

    def tokens(self) -> TokenTable:
        return self._tokens

    def sequence_offsets(self) -> np.ndarray:
        return sequence_offsets(self._tokens.seq_id)

    def select(
        self,
        *,
        layers: Sequence[int] | None = None,
        domain: str | int | Sequence[str | int] | None = None,
        sequences: Sequence[int] | np.ndarray | None = None,
        max_tokens: int | None = None,
    ) -> InMemoryTrace:
        """The same selections as ``Trace.select`` (the same checks and messages)."""
        keep_layers = selected_layers(layers, tuple(self._idx), self._check_layer)
        rows = selected_rows(self._tokens, self._domain_names, domain, sequences, max_tokens)
        return InMemoryTrace(
            {layer: self._idx[layer][rows] for layer in keep_layers},
            {layer: self._weight[layer][rows] for layer in keep_layers},
            self._tokens.take(rows),
            self._num_experts,
            self._domain_names,
            self._metadata,
        )
