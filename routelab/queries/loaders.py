"""The shipped query-routing datasets and a loader for a user's own CSV / JSONL / Parquet file.

Shipped (Parquet, zstd, inside the package; provenance and licences in ``data/``):

* ``routellm-mmlu``: 14,042 MMLU prompts x {Mixtral-8x7B-Instruct, GPT-4-1106}, correct or not.
* ``routellm-gsm8k``: 1,319 GSM8K problems x the same two models.
* ``routellm-mt-bench``: 80 MT-Bench questions x the same two models, GPT-4 judge score 1-10.
* ``llmrouter-9``: 5,610 queries from 13 tasks x 9 open LLMs, score in [0, 1] (LLMRouter's split).
* ``routerarena-sub10``: 809 RouterArena queries x {claude-3-haiku, gemini-2.0-flash}, with
  measured input/output tokens, so measured cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from routelab.core.errors import ConfigError, InputError, unknown_name
from routelab.queries.dataset import QueryDataset
from routelab.queries.prices import CostConvention, PriceRegistry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    licence: str


DATASETS: dict[str, DatasetInfo] = {
    info.name: info for info in (
        DatasetInfo("routellm-mmlu", "MMLU (57 subjects): Mixtral-8x7B vs GPT-4-1106, 0/1 correct (RouteLLM evals)",
                    "Apache-2.0 (RouteLLM); MMLU MIT"),
        DatasetInfo("routellm-gsm8k", "GSM8K: Mixtral-8x7B vs GPT-4-1106, 0/1 correct (RouteLLM evals)",
                    "Apache-2.0 (RouteLLM); GSM8K MIT"),
        DatasetInfo("routellm-mt-bench", "MT-Bench: Mixtral-8x7B vs GPT-4-1106, GPT-4 judge 1-10 (RouteLLM evals)",
                    "Apache-2.0 (RouteLLM, MT-Bench)"),
        DatasetInfo("llmrouter-9", "13 tasks x 9 open LLMs, scores in [0, 1] (LLMRouter dcrouter data, GPQA removed)",
                    "MIT (LLMRouter); prompts from their benchmarks"),
        DatasetInfo("routerarena-sub10", "RouterArena sub_10: claude-3-haiku vs gemini-2.0-flash, measured tokens",
                    "Apache-2.0 (RouterArena); prompts from ~40 sources"),
    )
}


TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson", ".parquet")


def data_dir() -> Path:
    """Folder of the shipped Parquet files, licences and provenance note."""
    return Path(str(resources.files("routelab.queries") / "data"))


def dataset_path(name: str) -> Path:
    if name not in DATASETS:
        raise unknown_name("dataset", "dataset", name, DATASETS)
    path = data_dir() / f"{name}.parquet"
    if not path.is_file():
        raise ConfigError(f"the shipped file of dataset {name!r} is missing ({path}); reinstall routelab.")
    return path


def load_dataset(name: str, *, decontaminate: bool = False) -> QueryDataset:
    """A shipped dataset by name; ``decontaminate`` drops prompts RouteLLM excludes from evaluation."""
    path = dataset_path(name)
    dataset = QueryDataset.from_long(pq.read_table(path), name=name, where=f"shipped dataset {name!r}")
    return dataset.decontaminated() if decontaminate else dataset


def list_datasets() -> list[dict]:
    """Name, size, models, split and cost convention of every shipped dataset (read from metadata)."""
    import json

    rows = []
    for name, info in DATASETS.items():
        path = dataset_path(name)
        meta = json.loads(pq.read_schema(path).metadata[b"routelab.queries"])
        table = pq.read_table(path, columns=["query_id", "model", "split"])
        models = sorted(set(table.column("model").to_pylist()))
        splits = table.column("split").to_pylist()
        per_model = len(models)
        rows.append({
            "name": name, "queries": table.num_rows // per_model, "models": per_model,
            "train": splits.count("train") // per_model, "test": splits.count("test") // per_model,
            "score": meta.get("score", ""), "cost": meta.get("cost_convention", ""), "licence": info.licence,
            "description": info.description, "model_names": models,
        })
    return rows


def read_table(path: str | Path) -> pa.Table:
    """A CSV, JSON-lines or Parquet file as an Arrow table (format from the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"query table {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pajson

            return pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"cannot read {str(path)!r}: {error}") from None
    raise InputError(f"query table {str(path)!r} must end in .csv, .jsonl (.json, .ndjson) or .parquet.")


def load_table(path: str | Path, *, name: str | None = None, prices: PriceRegistry | None = None,
               cost_convention: CostConvention | None = None) -> QueryDataset:
    """A user's long table (one row per query x model): columns query_id, model, score and optionally
    dataset, task, prompt, cost_usd, in_tokens, out_tokens, split, contaminated. Cost comes from
    cost_usd, else tokens x ``prices`` (an unpriced model is an error), else ``cost_convention``."""
    path = Path(path)
    return QueryDataset.from_long(read_table(path), name=name or path.stem, prices=prices,
                                  cost_convention=cost_convention, where=f"query table {str(path)!r}")


def resolve_dataset(name_or_path: str, *, decontaminate: bool = False) -> QueryDataset:
    """A shipped dataset name, or the path of a user's table."""
    if name_or_path in DATASETS:
        return load_dataset(name_or_path, decontaminate=decontaminate)
    if Path(name_or_path).suffix.lower() in TABLE_SUFFIXES:
        dataset = load_table(name_or_path)
        return dataset.decontaminated() if decontaminate else dataset
    raise unknown_name("dataset", "--datasets", name_or_path, DATASETS)
