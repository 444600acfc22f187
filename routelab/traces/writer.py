"""Streaming writer of routing traces (see ``routelab.traces.format`` for the layout).

Rows arrive per MoE layer (``add(layer, ...)``, one call per layer and forward); a row is
written once every layer has delivered it, in row groups of ``row_group_tokens`` rows and
shards of at most ``shard_tokens`` rows, so memory stays bounded by what the layers have not
yet all delivered. ``commit(state)`` makes everything written so far durable together with
a caller-defined resume state; ``TraceWriter.resume(path)`` continues from the last commit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from routelab.core.errors import ConfigError, InputError
from routelab.core.run_lock import LOCK_FILE, FolderLock
from routelab.core.validation import check_positive_int
from routelab.traces.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_FILE,
    SHARD_PATTERN,
    expert_id_type,
    idx_column,
    read_header,
    resolve_trace_dir,
    shard_schema,
    weight_column,
    write_json_atomic,
)


def to_numpy(value: Any, name: str) -> np.ndarray:
    """A torch tensor or array-like as a numpy array (bf16/fp16 tensors become float32)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        return value.cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}.") from err


class _RowQueue:
    """Pending rows of one stream, kept as a list of arrays with a common trailing shape."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.rows = 0

    def push(self, array: np.ndarray) -> None:
        if len(array):
            self.parts.append(array)
            self.rows += len(array)

    def view(self) -> np.ndarray | None:
        if not self.parts:
            return None
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts)]
        return self.parts[0]

    def take(self, n: int) -> list[np.ndarray]:
        """Remove and return the first ``n`` rows (as a list of arrays)."""
        out: list[np.ndarray] = []
        while n > 0:
            head = self.parts[0]
            if len(head) <= n:
                out.append(self.parts.pop(0))
                n -= len(head)
            else:
                out.append(head[:n])
                self.parts[0] = head[n:]
                n = 0
        self.rows -= sum(len(a) for a in out)
        return out


class TraceWriter:
    """Write a routing trace to the directory ``path``; use as a context manager.

    Args:
        path: trace directory to create (conventionally named ``*.trace``).
        metadata: JSON-serialisable description (suggested keys: ``model``, ``router``,
            ``corpus``, ``tokenizer_hash``, ``domain_names``); ``created_at``,
            ``routelab_version`` and ``format_version`` are added.
        num_layers: number of MoE layers (layer indices ``0 .. num_layers-1``).
        num_experts: routed experts per layer.
        shard_tokens: rows per Parquet shard file.
        row_group_tokens: rows per Parquet row group (the unit of chunked reads).
        overwrite: replace an existing trace at ``path``.

    Example::

        with TraceWriter("run.trace", {"model": "tinylm"}, num_layers=4, num_experts=8) as w:
            for layer, routing in enumerate(routings):
                w.add(layer, routing.topk_idx, routing.topk_weight, token_ids, seq_ids, positions)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: dict[str, Any] | None,
        num_layers: int,
        num_experts: int,
        *,
        shard_tokens: int = 1 << 18,
        row_group_tokens: int = 1 << 16,
        overwrite: bool = False,
        _header: dict[str, Any] | None = None,
    ) -> None:
        self.path = resolve_trace_dir(path)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.shard_tokens = check_positive_int("shard_tokens", shard_tokens)
        self.row_group_tokens = min(check_positive_int("row_group_tokens", row_group_tokens), self.shard_tokens)
        self._schema = shard_schema(self.num_layers, self.num_experts)
        self._id_dtype = np.int16 if expert_id_type(self.num_experts) == pa.int16() else np.int32
        self._lock = FolderLock(self.path, "trace folder").acquire()
        self._fresh = _header is None
        try:
            if _header is None:
                self._header = self._new_header(metadata)
                self._prepare_directory(overwrite)
            else:
                self._header = _header
        except BaseException:
            self._lock.release()
            raise
        self._domain_codes = {name: i for i, name in enumerate(self._header["domain_names"])}
        self._layer_rows = [0] * self.num_layers  # rows delivered per layer since the last flush origin
        self._layer_queues = [_RowQueue() for _ in range(self.num_layers)]
        self._token_queue = _RowQueue()  # [n, 4] int64: token_id, seq_id, position, domain
        self._flushed = 0  # rows written to shards (committed or not)
        self._committed_tokens = self._header["num_tokens"]
        self._k_max = self._header["k_max"]
        self._shard_writer: pq.ParquetWriter | None = None
        self._shard_file: str | None = None
        self._shard_rows = 0
        self._uncommitted_shards: list[dict[str, Any]] = []
        self._next_shard = 1 + max((int(s["file"][5:11]) for s in self._header["shards"]), default=-1)
        self._closed = False

    # ------------------------------------------------------------------ setup
    def _new_header(self, metadata: dict[str, Any] | None) -> dict[str, Any]:
        from routelab import __version__

        metadata = dict(metadata or {})
        domain_names = metadata.get("domain_names", [])
        if not isinstance(domain_names, (list, tuple)) or not all(isinstance(d, str) for d in domain_names):
            raise ConfigError(f"metadata['domain_names'] must be a list of strings, got {domain_names!r}.")
        metadata.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        metadata["routelab_version"] = __version__
        metadata["format_version"] = FORMAT_VERSION
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "metadata": metadata,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "k_max": 0,
            "num_tokens": 0,
            "domain_names": list(domain_names),
            "shards": [],
            "complete": False,
            "resume_state": None,
        }
        try:
            json.dumps(header)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"metadata must be JSON-serialisable (str, numbers, lists, dicts): {err}.") from err
        return header

    def _prepare_directory(self, overwrite: bool) -> None:
        if self.path.exists():
            if not self.path.is_dir():
                raise ConfigError(f"trace path {str(self.path)!r} exists and is not a directory.")
            if any(p.name != LOCK_FILE for p in self.path.iterdir()):
                if not overwrite:
                    raise ConfigError(
                        f"trace path {str(self.path)!r} already exists and is not empty; pass overwrite=True "
                        "(CLI: --overwrite) to replace it, or TraceWriter.resume(path) to continue it."
                    )
                if not (self.path / HEADER_FILE).exists():
                    raise ConfigError(
                        f"refusing to overwrite {str(self.path)!r}: it is not a routelab trace (no {HEADER_FILE})."
                    )
                for entry in self.path.iterdir():  # everything but the lock this writer holds
                    if entry.name != LOCK_FILE:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        write_json_atomic(self.path / HEADER_FILE, self._header)

    @classmethod
    def resume(cls, path: str | os.PathLike[str], **kwargs: Any) -> TraceWriter:
        """Continue an unfinished trace from its last ``commit``; uncommitted shards are deleted.

        ``writer.resume_state`` is the state passed to the last ``commit`` and
        ``writer.num_tokens`` the rows kept.
        """
        trace_dir = resolve_trace_dir(path)
        header = read_header(trace_dir)
        if header["complete"]:
            raise ConfigError(f"trace {str(trace_dir)!r} is complete; there is nothing to resume.")
        listed = {s["file"] for s in header["shards"]}
        for stray in trace_dir.glob("part-*.parquet"):
            if stray.name not in listed:
                stray.unlink()
        return cls(trace_dir, None, header["num_layers"], header["num_experts"], _header=header, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def metadata(self) -> dict[str, Any]:
        return self._header["metadata"]

    @property
    def domain_names(self) -> list[str]:
        return list(self._header["domain_names"])

    @property
    def num_tokens(self) -> int:
        """Rows committed so far (durable on disk)."""
        return self._committed_tokens

    @property
    def resume_state(self) -> Any:
        return self._header["resume_state"]

    # ------------------------------------------------------------------ adding rows
    def add(
        self,
        layer: int,
        topk_idx_TK: Any,
        topk_weight_TK: Any,
        token_ids_T: Any,
        seq_ids_T: Any,
        positions_T: Any,
        domains_T: Any = None,
    ) -> None:
        """Append the routing of ``T`` tokens at MoE layer ``layer``.

        Every layer must receive the same tokens in the same order; each call's token
        columns are checked against what other layers gave for those rows.

        Args:
            topk_idx_TK: int ``[T, K]`` expert ids, ``-1`` for empty slots; ``K`` may differ
                between calls.
            topk_weight_TK: float ``[T, K]`` gate weights.
            token_ids_T, seq_ids_T, positions_T: int ``[T]``.
            domains_T: None (unknown), one domain name for all rows, ``[T]`` names, or
                ``[T]`` int indices into ``domain_names``.
        """
        self._check_open()
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise InputError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}.")
        layer = int(layer)
        idx = to_numpy(topk_idx_TK, "topk_idx_TK")
        weight = to_numpy(topk_weight_TK, "topk_weight_TK")
        if idx.ndim == 1:
            idx = idx[:, None]
        if weight.ndim == 1:
            weight = weight[:, None]
        if idx.ndim != 2:
            raise InputError(f"topk_idx_TK must have shape [T, K], got {idx.shape}.")
        if not np.issubdtype(idx.dtype, np.integer):
            raise InputError(f"topk_idx_TK must hold integers (expert ids, -1 = empty), got dtype {idx.dtype}.")
        if weight.shape != idx.shape:
            raise InputError(f"topk_weight_TK has shape {weight.shape} but topk_idx_TK has {idx.shape}.")
        if not np.issubdtype(weight.dtype, np.floating):
            raise InputError(f"topk_weight_TK must be floating point, got dtype {weight.dtype}.")
        num_tokens = idx.shape[0]
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -1 or hi >= self.num_experts:
                raise InputError(
                    f"topk_idx_TK holds expert ids in [{lo}, {hi}]; valid ids are 0..{self.num_experts - 1} "
                    "and -1 for an empty slot."
                )
            if not np.isfinite(weight).all():
                raise InputError("topk_weight_TK contains NaN/Inf; the trace refuses to store them.")
        tokens = self._token_rows(num_tokens, token_ids_T, seq_ids_T, positions_T, domains_T)
        start = self._layer_rows[layer]
        self._merge_token_rows(layer, start, tokens)
        self._layer_queues[layer].push(_LayerBlock(idx.astype(self._id_dtype), weight.astype(np.float32)))
        self._layer_rows[layer] += num_tokens
        if idx.shape[1] > self._k_max:
            self._k_max = int(idx.shape[1])
        self._flush(final=False)

    def add_routing(self, layer: int, routing: Any, batch: Any, domains_T: Any = None) -> None:
        """Append a ``Routing`` of MoE layer ``layer`` with the ``TokenBatch`` it was computed on.

        Token ids come from ``batch.token_ids_T`` (-1 when unknown) and sequence ids from
        ``batch.seq_id_T`` (rows of that batch; pass your own global ids through ``add``).
        """
        token_ids = batch.token_ids_T if batch.token_ids_T is not None else np.full(batch.num_tokens, -1)
        self.add(layer, routing.topk_idx, routing.topk_weight, token_ids, batch.seq_id_T, batch.position_T, domains_T)

    def _token_rows(self, num_tokens: int, token_ids: Any, seq_ids: Any, positions: Any, domains: Any) -> np.ndarray:
        out = np.empty((num_tokens, 4), dtype=np.int64)
        columns = (("token_ids_T", token_ids), ("seq_ids_T", seq_ids), ("positions_T", positions))
        for col, (name, value) in enumerate(columns):
            array = to_numpy(value, name).reshape(-1) if value is not None else None
            if array is None or array.shape != (num_tokens,):
                shape = None if array is None else array.shape
                raise InputError(
                    f"{name} must have shape [{num_tokens}] (one entry per row of topk_idx_TK), got {shape}."
                )
            if num_tokens and not np.issubdtype(array.dtype, np.integer):
                raise InputError(f"{name} must hold integers, got dtype {array.dtype}.")
            out[:, col] = array
        if num_tokens and (out[:, 1].min() < 0 or out[:, 2].min() < 0):
            raise InputError("seq_ids_T and positions_T must be >= 0.")
        out[:, 3] = self._domain_column(num_tokens, domains)
        return out

    def _domain_column(self, num_tokens: int, domains: Any) -> np.ndarray:
        if domains is None:
            return np.full(num_tokens, -1, dtype=np.int64)
        if isinstance(domains, str):
            return np.full(num_tokens, self._domain_code(domains), dtype=np.int64)
        array = to_numpy(domains, "domains_T").reshape(-1)
        if array.shape != (num_tokens,):
            raise InputError(f"domains_T must have shape [{num_tokens}], got {array.shape}.")
        if num_tokens == 0:
            return np.zeros(0, dtype=np.int64)
        if np.issubdtype(array.dtype, np.integer):
            if array.min() < -1 or array.max() >= len(self._header["domain_names"]):
                raise InputError(
                    f"integer domains_T must index domain_names={self._header['domain_names']} (or be -1); "
                    f"got values in [{array.min()}, {array.max()}]."
                )
            return array.astype(np.int64)
        names, inverse = np.unique(array.astype(str), return_inverse=True)
        codes = np.array([self._domain_code(str(n)) for n in names], dtype=np.int64)
        return codes[inverse]

    def _domain_code(self, name: str) -> int:
        if name not in self._domain_codes:
            if len(self._domain_codes) >= 32767:
                raise InputError("a trace holds at most 32767 domain names.")
            self._domain_codes[name] = len(self._header["domain_names"])
            self._header["domain_names"].append(name)
        return self._domain_codes[name]

    def _merge_token_rows(self, layer: int, start: int, tokens: np.ndarray) -> None:
        """Check the rows other layers already gave; append the rows that are new."""
        known_end = self._flushed + self._token_queue.rows
        overlap = max(0, min(known_end - start, len(tokens)))
        if overlap:
            known = self._token_queue.view()[start - self._flushed : start - self._flushed + overlap]
            mine = tokens[:overlap]
            same = known[:, :3] == mine[:, :3]
            unknown_domain = (mine[:, 3] == -1) | (known[:, 3] == -1)
            same_domain = (known[:, 3] == mine[:, 3]) | unknown_domain
            if not (same.all() and same_domain.all()):
                bad = int(np.argmin(same.all(axis=1) & same_domain))
                raise InputError(
                    f"layer {layer} row {start + bad} has (token_id, seq_id, position, domain) = "
                    f"{tuple(mine[bad])} but another layer gave {tuple(known[bad])} for the same row; every "
                    "layer must receive the same tokens in the same order."
                )
            fill = known[:, 3] == -1
            if fill.any():
                known[fill, 3] = mine[fill, 3]
        self._token_queue.push(tokens[overlap:])

    # ------------------------------------------------------------------ flushing
    def _flush(self, *, final: bool) -> None:
        ready = min(self._layer_rows) - self._flushed
        while ready >= self.row_group_tokens or (final and ready > 0):
            n = min(ready, self.row_group_tokens)
            if self._shard_writer is not None:
                n = min(n, self.shard_tokens - self._shard_rows)
            self._write_rows(n)
            ready -= n

    def _write_rows(self, n: int) -> None:
        tokens = np.concatenate(self._token_queue.take(n))
        columns: dict[str, pa.Array] = {
            "token_id": pa.array(tokens[:, 0], pa.int64()),
            "seq_id": pa.array(tokens[:, 1], pa.int64()),
            "position": pa.array(tokens[:, 2].astype(np.int32), pa.int32()),
            "domain": pa.array(tokens[:, 3].astype(np.int16), pa.int16()),
        }
        id_type = self._schema.field(idx_column(0)).type
        for layer in range(self.num_layers):
            blocks: list[_LayerBlock] = self._layer_queues[layer].take(n)  # type: ignore[assignment]
            columns[idx_column(layer)] = _list_array([b.idx for b in blocks], id_type)
            columns[weight_column(layer)] = _list_array([b.weight for b in blocks], pa.list_(pa.float32()))
        table = pa.table(columns, schema=self._schema)
        if self._shard_writer is None:
            self._open_shard()
        self._shard_writer.write_table(table, row_group_size=n)
        self._shard_rows += n
        self._flushed += n
        if self._shard_rows >= self.shard_tokens:
            self._close_shard()

    def _open_shard(self) -> None:
        self._shard_file = SHARD_PATTERN.format(self._next_shard)
        self._next_shard += 1
        schema = self._schema.with_metadata({b"routelab.trace": f"{FORMAT_NAME} v{FORMAT_VERSION}".encode()})
        self._shard_writer = pq.ParquetWriter(
            self.path / self._shard_file, schema, compression="zstd", write_page_checksum=True
        )
        self._shard_rows = 0

    def _close_shard(self) -> None:
        if self._shard_writer is None:
            return
        self._shard_writer.close()
        self._uncommitted_shards.append({"file": self._shard_file, "num_tokens": self._shard_rows})
        self._shard_writer = None
        self._shard_file = None
        self._shard_rows = 0

    # ------------------------------------------------------------------ commit / close
    def commit(self, state: Any = None) -> None:
        """Make every row written so far durable, with ``state`` (JSON) to resume from.

        Call it between forwards: every layer must have received the same number of rows.
        """
        self._check_open()
        self._require_aligned("commit()")
        self._flush(final=True)
        self._close_shard()
        self._publish(complete=False, state=state)

    def close(self) -> None:
        """Write the remaining rows and mark the trace complete."""
        if self._closed:
            return
        self._require_aligned("close()")
        self._flush(final=True)
        self._close_shard()
        self._publish(complete=True, state=self._header["resume_state"])
        self._closed = True
        self._lock.release()

    def abort(self) -> None:
        """Drop everything not committed; the trace on disk stays at its last commit."""
        if self._closed:
            return
        if self._shard_writer is not None:
            self._shard_writer.close()
            (self.path / self._shard_file).unlink(missing_ok=True)
            self._shard_writer = None
        for shard in self._uncommitted_shards:
            (self.path / shard["file"]).unlink(missing_ok=True)
        self._uncommitted_shards = []
        self._closed = True
        if self._fresh and self._committed_tokens == 0:  # nothing to resume: leave no stub behind
            (self.path / HEADER_FILE).unlink(missing_ok=True)
        self._lock.release()

    def _publish(self, *, complete: bool, state: Any) -> None:
        shards = self._header["shards"] + self._uncommitted_shards
        header = dict(self._header)
        header.update(
            shards=shards,
            num_tokens=sum(s["num_tokens"] for s in shards),
            k_max=self._k_max,
            complete=complete,
            resume_state=state,
        )
        try:
            write_json_atomic(self.path / HEADER_FILE, header)
        except TypeError as err:
            raise ConfigError(f"the resume state must be JSON-serialisable: {err}.") from err
        self._header = header
        self._uncommitted_shards = []
        self._committed_tokens = header["num_tokens"]

    def _require_aligned(self, what: str) -> None:
        if len(set(self._layer_rows)) > 1:
            counts = ", ".join(f"layer {i}: {n}" for i, n in enumerate(self._layer_rows))
            raise InputError(
                f"{what} needs every layer to have received the same tokens, but the row counts differ ({counts})."
            )

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"the trace writer for {str(self.path)!r} is closed.")

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _LayerBlock:
    """Expert ids and weights of consecutive rows of one layer (``len`` = rows)."""

    __slots__ = ("idx", "weight")

    def __init__(self, idx: np.ndarray, weight: np.ndarray) -> None:
        self.idx = idx
        self.weight = weight

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, rows: slice) -> _LayerBlock:
        return _LayerBlock(self.idx[rows], self.weight[rows])


def _list_array(blocks: Sequence[np.ndarray], list_or_value_type: pa.DataType) -> pa.Array:
    """One list column from ``[n_i, K_i]`` blocks (rows of block i have ``K_i`` entries)."""
    value_type = list_or_value_type.value_type if pa.types.is_list(list_or_value_type) else list_or_value_type
    arrays = []
    for block in blocks:
        rows, width = block.shape
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, pa.int32())
        arrays.append(pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1), value_type)))
    return pa.concat_arrays(arrays) if len(arrays) > 1 else arrays[0]
