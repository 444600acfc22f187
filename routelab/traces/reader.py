"""Reading routing traces: ``Trace.open(path)``, per-layer arrays, selections and chunks.

Every failure to read (missing or truncated shard, corrupt page, values out of range) is an
``InputError`` that names the file and says what is wrong; nothing is guessed or filled in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routelab.core.errors import ConfigError, InputError, suggest
from routelab.core.validation import check_positive_int
from routelab.traces.format import (
    TOKEN_COLUMNS,
    idx_column,
    read_header,
    resolve_trace_dir,
    shard_schema,
    weight_column,
)


@dataclass(frozen=True)
class LayerRouting:
    """Routing of one MoE layer: ``topk_idx`` int32 ``[T, k_max]`` (-1 = empty slot) and
    ``topk_weight`` float32 ``[T, k_max]`` (0 in empty slots)."""

    topk_idx: np.ndarray
    topk_weight: np.ndarray


@dataclass(frozen=True)
class TokenTable:
    """Per-token columns: ``token_id``, ``seq_id`` (int64), ``position`` (int32) and
    ``domain`` (int16 index into the trace's ``domain_names``, -1 = unknown)."""

    token_id: np.ndarray
    seq_id: np.ndarray
    position: np.ndarray
    domain: np.ndarray

    def __len__(self) -> int:
        return len(self.token_id)

    def take(self, rows: np.ndarray) -> TokenTable:
        return TokenTable(self.token_id[rows], self.seq_id[rows], self.position[rows], self.domain[rows])


def selected_layers(
    layers: Sequence[int] | None, all_layers: tuple[int, ...], check: Callable[[int], int]
) -> tuple[int, ...]:
    """The layers a selection keeps (``None`` = all), each checked by ``check``; at least one."""
    if layers is None:
        return all_layers
    kept = tuple(check(layer) for layer in layers)
    if not kept:
        raise ConfigError("layers must name at least one layer.")
    return kept


def domain_code(domain: str | int, names: Sequence[str]) -> int:
    """The code of a domain given by name or code (``-1`` = no domain), checked against ``names``."""
    names = list(names)
    if isinstance(domain, str):
        if domain not in names:
            raise ConfigError(f"domain={domain!r} is not in this trace.{suggest(domain, names)} Domains: {names}.")
        return names.index(domain)
    if not -1 <= int(domain) < len(names):
        raise ConfigError(f"domain code {domain} is out of range; the trace has domains {names}.")
    return int(domain)


def selected_rows(
    tokens: TokenTable,
    domain_names: Sequence[str],
    domain: str | int | Sequence[str | int] | None,
    sequences: Sequence[int] | np.ndarray | None,
    max_tokens: int | None,
) -> np.ndarray:
    """Indices of the token rows that a ``select(domain=, sequences=, max_tokens=)`` keeps."""
    keep = np.ones(len(tokens), dtype=bool)
    if domain is not None:
        codes = [domain_code(d, domain_names) for d in ([domain] if isinstance(domain, (str, int)) else domain)]
        keep &= np.isin(tokens.domain, codes)
    if sequences is not None:
        keep &= np.isin(tokens.seq_id, np.asarray(sequences, dtype=np.int64))
    if max_tokens is not None:
        keep[check_positive_int("max_tokens", max_tokens):] = False
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class TraceChunk:
    """A run of consecutive selected rows: their token columns and, for the requested
    layers, ``topk_idx_LTK`` int32 ``[L, T, k_max]`` and ``topk_weight_LTK`` float32."""

    tokens: TokenTable
    layers: tuple[int, ...]
    topk_idx_LTK: np.ndarray
    topk_weight_LTK: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def sequence_offsets(seq_id_T: np.ndarray) -> np.ndarray:
    """Start offsets ``[S+1]`` of the runs of equal consecutive ``seq_id`` (a sequence)."""
    if len(seq_id_T) == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(np.diff(seq_id_T) != 0) + 1
    return np.concatenate([[0], starts, [len(seq_id_T)]]).astype(np.int64)


class _TraceFiles:
    """The shards of one trace on disk, opened lazily, with error wrapping."""

    def __init__(self, trace_dir: Path, header: dict[str, Any]) -> None:
        self.dir = trace_dir
        self.header = header
        self.schema = shard_schema(header["num_layers"], header["num_experts"])
        self.files: list[pq.ParquetFile] = []
        self.row_groups: list[tuple[int, int, int, int]] = []  # (shard, row group, first row, rows)
        row = 0
        for shard_index, shard in enumerate(header["shards"]):
            path = trace_dir / shard["file"]
            if not path.is_file():
                raise InputError(f"trace shard {path} listed in {trace_dir / 'trace.json'} is missing.")
            try:
                pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
            except (pa.ArrowException, OSError) as err:
                raise InputError(
                    f"trace shard {path} is truncated or corrupt (its Parquet footer cannot be read): {err}"
                ) from err
            if pf.metadata.num_rows != shard["num_tokens"]:
                raise InputError(
                    f"trace shard {path} holds {pf.metadata.num_rows} rows but the header says {shard['num_tokens']}."
                )
            if not pf.schema_arrow.remove_metadata().equals(self.schema):
                raise InputError(
                    f"trace shard {path} has columns {pf.schema_arrow.names} that do not match a trace with "
                    f"{header['num_layers']} layers and {header['num_experts']} experts."
                )
            for group in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                self.row_groups.append((shard_index, group, row, rows))
                row += rows
            self.files.append(pf)

    def shard_path(self, shard_index: int) -> Path:
        return self.dir / self.header["shards"][shard_index]["file"]

    def read_group(self, group_index: int, columns: Sequence[str]) -> pa.Table:
        shard, group, _, _ = self.row_groups[group_index]
        try:
            return self.files[shard].read_row_group(group, columns=list(columns))
        except (pa.ArrowException, OSError) as err:
            raise InputError(
                f"trace shard {self.shard_path(shard)} is corrupt (row group {group} cannot be read): {err}"
            ) from err

    def read_column(self, name: str) -> list[pa.Array]:
        chunks: list[pa.Array] = []
        for shard, pf in enumerate(self.files):
            try:
                column = pf.read(columns=[name]).column(0)
            except (pa.ArrowException, OSError) as err:
                raise InputError(f"trace shard {self.shard_path(shard)} is corrupt (column {name!r}): {err}") from err
            chunks.extend(column.chunks)
        return chunks


def _padded(chunks: Sequence[pa.Array], k_max: int, fill: float, dtype: Any, what: str, path: Path) -> np.ndarray:
    """List chunks -> ``[T, k_max]`` array, rows shorter than ``k_max`` padded with ``fill``."""
    parts = []
    for chunk in chunks:
        n = len(chunk)
        lengths = chunk.value_lengths().to_numpy(zero_copy_only=False)
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        if n and lengths.max(initial=0) > k_max:
            raise InputError(
                f"trace {path}: a row of {what} has {lengths.max()} slots but the header says k_max={k_max}."
            )
        if k_max and (lengths == k_max).all():
            parts.append(values.astype(dtype, copy=False).reshape(n, k_max))
            continue
        out = np.full((n, k_max), fill, dtype=dtype)
        rows = np.repeat(np.arange(n), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, dtype=np.int64)
        cols = np.arange(len(values)) - np.repeat(starts, lengths)
        out[rows, cols] = values
        parts.append(out)
    if not parts:
        return np.full((0, k_max), fill, dtype=dtype)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class Trace:
    """A routing trace on disk (see ``routelab.traces.format``), or a selection of one.

    ``Trace.open(path)`` reads the header and checks every shard's footer; the routing of a
    layer is read on demand (``layer(l)``) or in row-group chunks (``iter_chunks``).
    ``select(layers=..., domain=...)`` returns a view with the same interface.

    Attributes:
        metadata: the header's metadata (model, router, corpus, tokenizer hash, ...).
        num_layers, num_experts, k_max, num_tokens: shape of the (selected) trace.
        layers: the selected MoE layer indices; ``layer(l)`` takes one of them.
        domain_names: names of the domain codes.
    """

    def __init__(self, files: _TraceFiles, layers: tuple[int, ...], rows: np.ndarray | None) -> None:
        self._files = files
        self._layers = layers
        self._rows = rows  # sorted selected row indices, None = all rows

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> Trace:
        """Open the trace directory ``path`` (or its ``trace.json``).

        Args:
            allow_incomplete: also open a trace whose writer did not finish (it holds the
                rows up to the last commit).
        """
        trace_dir = resolve_trace_dir(path)
        header = read_header(trace_dir)
        if not header["complete"] and not allow_incomplete:
            raise InputError(
                f"trace {str(trace_dir)!r} is incomplete: its writer stopped after {header['num_tokens']} tokens "
                "(interrupted run). Resume it (`routelab trace ... --resume`) or open it with "
                "Trace.open(path, allow_incomplete=True)."
            )
        files = _TraceFiles(trace_dir, header)
        return cls(files, tuple(range(header["num_layers"])), None)

    # ------------------------------------------------------------------ shape
    @property
    def path(self) -> Path:
        return self._files.dir

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._files.header["metadata"])

    @property
    def num_experts(self) -> int:
        return int(self._files.header["num_experts"])

    @property
    def k_max(self) -> int:
        return int(self._files.header["k_max"])

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_tokens(self) -> int:
        return int(self._files.header["num_tokens"]) if self._rows is None else len(self._rows)

    @property
    def domain_names(self) -> list[str]:
        return list(self._files.header["domain_names"])

    @property
    def complete(self) -> bool:
        return bool(self._files.header["complete"])

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, tokens={self.num_tokens}, layers={self.num_layers}, "
            f"experts={self.num_experts}, k_max={self.k_max})"
        )

    # ------------------------------------------------------------------ whole columns
    @cached_property
    def _all_tokens(self) -> TokenTable:
        cols = {}
        for name in TOKEN_COLUMNS:
            chunks = self._files.read_column(name)
            cols[name] = (
                np.concatenate([c.to_numpy(zero_copy_only=False) for c in chunks])
                if chunks
                else np.zeros(0, dtype={"position": np.int32, "domain": np.int16}.get(name, np.int64))
            )
        domain = cols["domain"]
        if len(domain) and (domain.min() < -1 or domain.max() >= len(self.domain_names)):
            raise InputError(f"trace {self.path}: domain codes out of range of domain_names; the trace is corrupt.")
        return TokenTable(cols["token_id"], cols["seq_id"], cols["position"], cols["domain"])

    def tokens(self) -> TokenTable:
        """Token id, sequence id, position and domain of every selected row."""
        table = self._all_tokens
        return table if self._rows is None else table.take(self._rows)

    def sequence_offsets(self) -> np.ndarray:
        """Offsets ``[S+1]`` of the sequences (runs of equal ``seq_id``) among the selected rows."""
        return sequence_offsets(self.tokens().seq_id)

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_offsets()) - 1

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in self._layers:
            raise ConfigError(f"layer={layer!r} is not in this trace; available layers: {list(self._layers)}.")
        return int(layer)

    def layer(self, layer: int) -> LayerRouting:
        """The routing of MoE layer ``layer`` for every selected row."""
        layer = self._check_layer(layer)
        idx = _padded(self._files.read_column(idx_column(layer)), self.k_max, -1, np.int32, f"layer {layer}", self.path)
        weight = _padded(
            self._files.read_column(weight_column(layer)), self.k_max, 0.0, np.float32, f"layer {layer}", self.path
        )
        self._check_values(idx, weight, f"layer {layer}")
        if self._rows is not None:
            idx, weight = idx[self._rows], weight[self._rows]
        return LayerRouting(idx, weight)

    def topk_idx(self, layer: int) -> np.ndarray:
        """``layer(layer).topk_idx`` (int32 ``[T, k_max]``)."""
        return self.layer(layer).topk_idx

    def _check_values(self, idx: np.ndarray, weight: np.ndarray, what: str) -> None:
        if idx.size and (idx.min() < -1 or idx.max() >= self.num_experts):
            raise InputError(
                f"trace {self.path}: {what} holds expert ids outside [-1, {self.num_experts}); the trace is corrupt."
            )
        if weight.size and not np.isfinite(weight).all():
            raise InputError(f"trace {self.path}: {what} holds NaN/Inf gate weights; the trace is corrupt.")

    # ------------------------------------------------------------------ selections
    def select(
        self,
        *,
        layers: Sequence[int] | None = None,
        domain: str | int | Sequence[str | int] | None = None,
        sequences: Sequence[int] | np.ndarray | None = None,
        max_tokens: int | None = None,
    ) -> Trace:
        """A view restricted to some layers, domains, sequence ids and/or the first ``max_tokens`` rows."""
        new_layers = selected_layers(layers, self._layers, self._check_layer)
        local = None
        if domain is not None or sequences is not None or max_tokens is not None:
            local = selected_rows(self.tokens(), self.domain_names, domain, sequences, max_tokens)
        rows = self._rows
        if local is not None:
            rows = local if self._rows is None else self._rows[local]
        return Trace(self._files, new_layers, rows)

    # ------------------------------------------------------------------ chunked reading
    def iter_chunks(self, layers: Sequence[int] | None = None) -> Iterator[TraceChunk]:
        """Yield the selected rows one Parquet row group at a time (bounded memory)."""
        layer_ids = self._layers if layers is None else tuple(self._check_layer(layer) for layer in layers)
        columns = list(TOKEN_COLUMNS)
        for layer in layer_ids:
            columns += [idx_column(layer), weight_column(layer)]
        for group_index, (shard, _, first, count) in enumerate(self._files.row_groups):
            local = None
            if self._rows is not None:
                lo, hi = np.searchsorted(self._rows, [first, first + count])
                if lo == hi:
                    continue
                local = self._rows[lo:hi] - first
            table = self._files.read_group(group_index, columns)
            path = self._files.shard_path(shard)
            tokens = TokenTable(*(table.column(name).to_numpy() for name in TOKEN_COLUMNS))
            idx = np.stack(
                [_padded(table.column(idx_column(layer)).chunks, self.k_max, -1, np.int32, f"layer {layer}", path)
                 for layer in layer_ids]
            ) if layer_ids else np.zeros((0, count, self.k_max), np.int32)
            weight = np.stack(
                [_padded(table.column(weight_column(layer)).chunks, self.k_max, 0.0, np.float32, f"layer {layer}", path)
                 for layer in layer_ids]
            ) if layer_ids else np.zeros((0, count, self.k_max), np.float32)
            self._check_values(idx, weight, f"row group {group_index}")
            if local is not None:
                tokens, idx, weight = tokens.take(local), idx[:, local], weight[:, local]
            yield TraceChunk(tokens, layer_ids, idx, weight)

    def iter_sequences(self, layers: Sequence[int] | None = None) -> Iterator[TraceChunk]:
        """Yield one chunk per sequence (run of equal ``seq_id``), reading row group by row group."""
        pending: list[TraceChunk] = []
        for chunk in self.iter_chunks(layers):
            offsets = sequence_offsets(chunk.tokens.seq_id)
            for s in range(len(offsets) - 1):
                part = _slice_chunk(chunk, offsets[s], offsets[s + 1])
                if pending and pending[-1].tokens.seq_id[-1] != part.tokens.seq_id[0]:
                    yield _join_chunks(pending)
                    pending = []
                pending.append(part)
        if pending:
            yield _join_chunks(pending)


def _slice_chunk(chunk: TraceChunk, start: int, stop: int) -> TraceChunk:
    rows = slice(int(start), int(stop))
    tokens = TokenTable(*(getattr(chunk.tokens, name)[rows] for name in TOKEN_COLUMNS))
    return TraceChunk(tokens, chunk.layers, chunk.topk_idx_LTK[:, rows], chunk.topk_weight_LTK[:, rows])


def _join_chunks(chunks: list[TraceChunk]) -> TraceChunk:
    if len(chunks) == 1:
        return chunks[0]
    tokens = TokenTable(*(np.concatenate([getattr(c.tokens, name) for c in chunks]) for name in TOKEN_COLUMNS))
    return TraceChunk(
        tokens,
        chunks[0].layers,
        np.concatenate([c.topk_idx_LTK for c in chunks], axis=1),
        np.concatenate([c.topk_weight_LTK for c in chunks], axis=1),
    )
