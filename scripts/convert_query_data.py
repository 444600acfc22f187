"""Build the query-routing datasets shipped in ``routelab/queries/data/`` from upstream files.

Reproducible: the same upstream files always give byte-identical Parquet files. Upstream
snapshots (data files only; fetch them with ``git archive`` at these commits):

* lm-sys/RouteLLM @ 0b64fdafe049e596a3f5657c219329f24af24198 (Apache-2.0):
  ``routellm/evals/{mmlu/responses/mmlu_*.csv, gsm8k/gsm8k_responses.csv,
  mt_bench/{judgements,question}.jsonl, */contaminated_prompts.jsonl}``
* ulab-uiuc/LLMRouter @ 4e7a796942ce26e9d5f2b93191c7c2585c99c2e3 (MIT):
  ``data/dcrouter_preprocessed/{train,test}.json``, ``data/example_data/query_data/default_query_*.jsonl``
  (task names, joined on the query text), ``data/example_data/llm_candidates/default_llm.json`` (prices)
* RouteWorks/RouterArena @ 4714a9ad73e897a1241e73a86c9297fed2e871d8 (Apache-2.0):
  ``cached_results/{claude-3-haiku-20240307,gemini-2.0-flash-001}.jsonl``, ``model_cost/cost.json``

Expected layout under ``--source``: ``routellm/routellm/evals/...``, ``llmrouter/data/...``,
``routerarena/{cached_results,model_cost}/...``, each with its upstream ``LICENSE``.
GPQA items must already be removed from the LLMRouter files (its authors ask that GPQA not be
reposted in plain text); the script refuses files that still hold a GPQA task.

Usage::

    python scripts/convert_query_data.py --source /path/to/upstream --out routelab/queries/data

What it does, per dataset (one long table: query_id, dataset, task, prompt, model, score,
cost_usd, in_tokens, out_tokens, split, contaminated):

* RouteLLM MMLU / GSM8K: one row per (prompt, model); score = 1.0 if the model's answer was
  correct. MT-Bench: the query is a question (its first turn is the prompt, as RouteLLM
  routes on the first turn); score = the mean GPT-4 judge score (1-10) of its two turns.
  ``contaminated`` marks prompts RouteLLM's contamination lists exclude from its evaluation.
  No token counts: cost follows RouteLLM's convention (95 input + 264 output tokens at list price).
* LLMRouter: the 9-model dcrouter scores in [0, 1] with its own train/test split; task from
  the query-data files. No token counts: the same nominal convention at LLMRouter's prices.
* RouterArena sub_10: measured input/output tokens per call and cost.json prices.
* RouteLLM and RouterArena have no split: a fixed 70/30 train/test split by a seeded permutation.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from routelab.queries.dataset import default_split
from routelab.queries.prices import MEASURED_TOKENS, ROUTELLM_APPENDIX_D, Price, PriceRegistry

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
SPLIT_SEED = 0
TRAIN_FRACTION = 0.7
SCHEMA = pa.schema([
    ("query_id", pa.string()), ("dataset", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
    ("model", pa.string()), ("score", pa.float64()), ("cost_usd", pa.float64()), ("in_tokens", pa.int64()),
    ("out_tokens", pa.int64()), ("split", pa.string()), ("contaminated", pa.bool_()),
])


def seeded_split(n: int) -> list[str]:
    return default_split(n, TRAIN_FRACTION, SPLIT_SEED).tolist()


def contaminated_prompts(path: Path) -> set[str]:
    return {json.loads(line)["eval_prompt"] for line in path.read_text().split("\n") if line.strip()}


def nominal_cost(registry: PriceRegistry, model: str) -> float:
    return float(registry.cost(model, ROUTELLM_APPENDIX_D.in_tokens, ROUTELLM_APPENDIX_D.out_tokens))


def long_rows(queries: list[dict], models: list[str], dataset: str) -> list[dict]:
    """One row per (query, model) from ``{query_id, task, prompt, split, contaminated, scores, costs, tokens}``."""
    rows = []
    for q in queries:
        for model in models:
            in_tok, out_tok = q.get("tokens", {}).get(model, (None, None))
            rows.append({
                "query_id": q["query_id"], "dataset": dataset, "task": q["task"], "prompt": q["prompt"],
                "model": model, "score": float(q["scores"][model]), "cost_usd": float(q["costs"][model]),
                "in_tokens": in_tok, "out_tokens": out_tok, "split": q["split"],
                "contaminated": bool(q.get("contaminated", False)),
            })
    return rows


def write(rows: list[dict], path: Path, meta: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.replace_schema_metadata({"routelab.queries": json.dumps(meta, sort_keys=True)})
    pq.write_table(table, path, compression="zstd", compression_level=19, use_dictionary=["dataset", "task", "model",
                   "split"], write_statistics=False)
    print(f"{path.name}: {table.num_rows:,} rows, {path.stat().st_size / 1e6:.2f} MB")


def routellm_two_model(rows_in: list[dict], dataset: str, registry: PriceRegistry, dirty: set[str], qid) -> list[dict]:
    costs = {m: nominal_cost(registry, m) for m in (WEAK, STRONG)}
    split = seeded_split(len(rows_in))
    queries = []
    for i, (task, index, row) in enumerate(rows_in):
        queries.append({
            "query_id": qid(task, index), "task": task, "prompt": row["prompt"], "split": split[i],
            "contaminated": row["prompt"] in dirty, "costs": costs,
            "scores": {m: {"True": 1.0, "False": 0.0}[row[m]] for m in (WEAK, STRONG)},
        })
    return long_rows(queries, [WEAK, STRONG], dataset)


def convert_mmlu(evals: Path, registry: PriceRegistry) -> list[dict]:
    rows_in = []
    for path in sorted((evals / "mmlu" / "responses").glob("mmlu_*.csv")):
        subject = path.stem[len("mmlu_"):]
        with path.open(newline="") as handle:
            rows_in += [(subject, i, row) for i, row in enumerate(csv.DictReader(handle))]
    dirty = contaminated_prompts(evals / "mmlu" / "contaminated_prompts.jsonl")
    return routellm_two_model(rows_in, "routellm-mmlu", registry, dirty, lambda t, i: f"mmlu/{t}/{i}")


def convert_gsm8k(evals: Path, registry: PriceRegistry) -> list[dict]:
    with (evals / "gsm8k" / "gsm8k_responses.csv").open(newline="") as handle:
        rows_in = [("gsm8k", i, row) for i, row in enumerate(csv.DictReader(handle))]
    dirty = contaminated_prompts(evals / "gsm8k" / "contaminated_prompts.jsonl")
    return routellm_two_model(rows_in, "routellm-gsm8k", registry, dirty, lambda t, i: f"gsm8k/{i}")


def convert_mt_bench(evals: Path, registry: PriceRegistry) -> list[dict]:
    folder = evals / "mt_bench"
    questions = [json.loads(line) for line in (folder / "question.jsonl").read_text().split("\n") if line.strip()]
    turn_scores: dict[tuple[int, str], list[float]] = {}
    for line in (folder / "judgements.jsonl").read_text().split("\n"):
        if line.strip():
            j = json.loads(line)
            turn_scores.setdefault((j["question_id"], j["model"]), []).append(float(j["score"]))
    dirty = contaminated_prompts(folder / "contaminated_prompts.jsonl")
    costs = {m: nominal_cost(registry, m) for m in (WEAK, STRONG)}
    split = seeded_split(len(questions))
    queries = []
    for i, q in enumerate(questions):
        scores = {}
        for m in (WEAK, STRONG):
            values = turn_scores[(q["question_id"], m)]
            if len(values) != 2:
                raise ValueError(f"MT-Bench question {q['question_id']} has {len(values)} judged turns for {m}")
            scores[m] = sum(values) / 2
        queries.append({
            "query_id": f"mt-bench/{q['question_id']}", "task": q["category"], "prompt": q["turns"][0],
            "split": split[i], "contaminated": q["turns"][0] in dirty or q["turns"][1] in dirty,
            "costs": costs, "scores": scores,
        })
    return long_rows(queries, [WEAK, STRONG], "routellm-mt-bench")


def convert_llmrouter(root: Path, registry: PriceRegistry) -> list[dict]:
    data = root / "data"
    prices = json.loads((data / "example_data" / "llm_candidates" / "default_llm.json").read_text())
    task_of: dict[str, str] = {}
    for name in ("default_query_train.jsonl", "default_query_test.jsonl"):
        for line in (data / "example_data" / "query_data" / name).read_text().split("\n"):
            if line.strip():
                record = json.loads(line)
                if "gpqa" in record["task_name"].lower():
                    raise ValueError("GPQA rows must be removed from the LLMRouter query files before shipping")
                task_of.setdefault(record["query"], record["task_name"])
    queries, models = [], None
    for split in ("train", "test"):
        for i, record in enumerate(json.loads((data / "dcrouter_preprocessed" / f"{split}.json").read_text())):
            models = models or list(record["scores"])
            if set(record["scores"]) != set(models):
                raise ValueError("LLMRouter records score different sets of models")
            if record["question"] not in task_of:
                raise ValueError(f"LLMRouter {split} query {i} has no task in the query-data files")
            queries.append({
                "query_id": f"llmrouter/{split}/{i}", "task": task_of[record["question"]], "prompt": record["question"],
                "split": split, "scores": record["scores"],
                "costs": {m: nominal_cost(registry, m) for m in record["scores"]},
            })
    for m in models:
        upstream = prices[m]
        if registry.price(m) != Price(upstream["input_price"], upstream["output_price"], registry.price(m).source):
            raise ValueError(f"registry price of {m} differs from default_llm.json")
    return long_rows(queries, models, "llmrouter-9")


def convert_routerarena(root: Path, registry: PriceRegistry) -> list[dict]:
    prices = json.loads((root / "model_cost" / "cost.json").read_text())
    models = ["claude-3-haiku-20240307", "gemini-2.0-flash-001"]
    per_model = {}
    for m in models:
        upstream = prices[m]
        if registry.price(m) != Price(upstream["input_token_price_per_million"], upstream["output_token_price_per_million"],
                                      registry.price(m).source):
            raise ValueError(f"registry price of {m} differs from cost.json")
        records = [json.loads(line) for line in (root / "cached_results" / f"{m}.jsonl").read_text().split("\n")
                   if line.strip()]
        per_model[m] = {r["global_index"]: r for r in records}
    ids = list(per_model[models[0]])
    if set(ids) != set(per_model[models[1]]):
        raise ValueError("the RouterArena files cover different queries")
    split = seeded_split(len(ids))
    queries = []
    for i, gid in enumerate(ids):
        tokens = {m: (int(per_model[m][gid]["token_usage"]["input_tokens"]),
                      int(per_model[m][gid]["token_usage"]["output_tokens"])) for m in models}
        queries.append({
            "query_id": gid, "task": gid.rsplit("_", 1)[0], "prompt": per_model[models[0]][gid]["question"],
            "split": split[i], "tokens": tokens,
            "scores": {m: float(per_model[m][gid]["evaluation_result"]["score"]) for m in models},
            "costs": {m: float(registry.cost(m, *tokens[m])) for m in models},
        })
    return long_rows(queries, models, "routerarena-sub10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with routellm/, llmrouter/, routerarena/")
    parser.add_argument("--out", type=Path, default=Path("routelab/queries/data"))
    args = parser.parse_args()
    registry = PriceRegistry()
    args.out.mkdir(parents=True, exist_ok=True)
    evals = args.source / "routellm" / "routellm" / "evals"
    routellm_meta = {"cost_convention": str(ROUTELLM_APPENDIX_D), "upstream": "lm-sys/RouteLLM@0b64fdaf",
                     "licence": "Apache-2.0"}
    jobs = [
        ("routellm-mmlu", convert_mmlu(evals, registry), {**routellm_meta, "score": "correct (0/1)"}),
        ("routellm-gsm8k", convert_gsm8k(evals, registry), {**routellm_meta, "score": "correct (0/1)"}),
        ("routellm-mt-bench", convert_mt_bench(evals, registry),
         {**routellm_meta, "score": "GPT-4 judge score 1-10, mean of two turns"}),
        ("llmrouter-9", convert_llmrouter(args.source / "llmrouter", registry),
         {"cost_convention": str(ROUTELLM_APPENDIX_D), "upstream": "ulab-uiuc/LLMRouter@4e7a7969", "licence": "MIT",
          "score": "task metric in [0, 1]"}),
        ("routerarena-sub10", convert_routerarena(args.source / "routerarena", registry),
         {"cost_convention": MEASURED_TOKENS, "upstream": "RouteWorks/RouterArena@4714a9ad", "licence": "Apache-2.0",
          "score": "task metric (mostly 0/1)"}),
    ]
    for name, rows, meta in jobs:
        write(rows, args.out / f"{name}.parquet", meta)
    licences = args.out / "licenses"
    licences.mkdir(exist_ok=True)
    for name in ("routellm", "llmrouter", "routerarena"):
        shutil.copyfile(args.source / name / "LICENSE", licences / f"{name}-LICENSE.txt")


if __name__ == "__main__":
    main()
