"""On-disk layout of a routing trace (format ``routelab-trace`` version 1).

A trace is a directory::

    my.trace/
      trace.json            header: metadata, shape, shard list, resume state
      part-000000.parquet   one row per token, in the order the tokens were written
      part-000001.parquet
      ...

Every shard is a Parquet file (pyarrow, zstd, page checksums) with the columns

==================  ======================  ==============================================
column              type                    meaning
==================  ======================  ==============================================
``token_id``        int64                   vocabulary id of the token
``seq_id``          int64                   sequence the token belongs to
``position``        int32                   position of the token inside its sequence
``domain``          int16                   index into ``domain_names`` (-1 = unknown)
``idx_<l>``         list<int16 or int32>    expert ids of MoE layer ``l``; -1 = empty slot
``weight_<l>``      list<float32>           gate weights of MoE layer ``l`` (0 in empty slots)
==================  ======================  ==============================================

for ``l = 0 .. num_layers-1``. The lists of one row hold the ``k`` slots the router gave
that token; ``k`` may vary between rows and readers pad to ``k_max`` with ``-1``/``0``.
``trace.json`` lists only shards that were completely written (a shard is added after its
Parquet footer is on disk), so an interrupted trace is always readable up to its last commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from routelab.core.errors import InputError

FORMAT_NAME = "routelab-trace"
FORMAT_VERSION = 1
HEADER_FILE = "trace.json"
SHARD_PATTERN = "part-{:06d}.parquet"
TOKEN_COLUMNS = ("token_id", "seq_id", "position", "domain")
HEADER_KEYS = ("format", "version", "metadata", "num_layers", "num_experts", "k_max", "num_tokens",
               "domain_names", "shards", "complete", "resume_state")


def idx_column(layer: int) -> str:
    return f"idx_{layer}"


def weight_column(layer: int) -> str:
    return f"weight_{layer}"


def expert_id_type(num_experts: int) -> pa.DataType:
    """The narrowest signed integer type that holds expert ids ``-1 .. num_experts-1``."""
    return pa.int16() if num_experts <= 32767 else pa.int32()


def shard_schema(num_layers: int, num_experts: int) -> pa.Schema:
    fields = [
        pa.field("token_id", pa.int64(), nullable=False),
        pa.field("seq_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("domain", pa.int16(), nullable=False),
    ]
    id_type = expert_id_type(num_experts)
    for layer in range(num_layers):
        fields.append(pa.field(idx_column(layer), pa.list_(id_type), nullable=False))
        fields.append(pa.field(weight_column(layer), pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields)


def resolve_trace_dir(path: str | os.PathLike[str]) -> Path:
    """Accept the trace directory or its ``trace.json``."""
    path = Path(path)
    if path.name == HEADER_FILE:
        return path.parent
    return path


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file and rename it over ``path`` (never a half-written header)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(trace_dir: Path) -> dict[str, Any]:
    """Read and check ``trace.json``; every problem is an ``InputError`` naming the file."""
    header_path = trace_dir / HEADER_FILE
    if not trace_dir.exists():
        raise InputError(f"trace path {str(trace_dir)!r} does not exist.")
    if not header_path.is_file():
        raise InputError(
            f"{str(trace_dir)!r} is not a routelab trace: {HEADER_FILE} is missing. A trace is the directory "
            "written by routelab.traces.TraceWriter or `routelab trace`."
        )
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{header_path} is not valid JSON (truncated or corrupt header): {err}.") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise InputError(f"{header_path} is not a routelab trace header (format must be {FORMAT_NAME!r}).")
    if header.get("version") != FORMAT_VERSION:
        raise InputError(
            f"{header_path} has trace format version {header.get('version')!r}; this routelab reads version "
            f"{FORMAT_VERSION}. Re-create the trace with this routelab version."
        )
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise InputError(f"{header_path} lacks the keys {missing}; the header is corrupt.")
    for key in ("num_layers", "num_experts", "k_max", "num_tokens"):
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{header_path}: {key} must be a non-negative integer, got {value!r}.")
    if header["num_layers"] < 1 or header["num_experts"] < 1:
        raise InputError(f"{header_path}: num_layers and num_experts must be >= 1.")
    shards = header["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_tokens"), int) for s in shards
    ):
        raise InputError(f"{header_path}: 'shards' must be a list of {{file, num_tokens}} entries.")
    if sum(s["num_tokens"] for s in shards) != header["num_tokens"]:
        raise InputError(f"{header_path}: the shard sizes do not add up to num_tokens={header['num_tokens']}.")
    return header
