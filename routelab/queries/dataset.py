"""The query-routing dataset: one long table of recorded outcomes, held as query x model arrays.

Long form (what files hold): one row per (query, model) with columns ``query_id, dataset,
task, prompt, model, score, cost_usd, in_tokens, out_tokens, split`` (+ ``contaminated``).
In memory every (query, model) pair must be present exactly once, so the table becomes
dense arrays ``score_QM``, ``cost_QM`` (Q queries, M models) that routers and metrics use.
Nothing calls an LLM: routers are evaluated by replaying these recorded outcomes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from routelab.core.errors import InputError
from routelab.queries.prices import MEASURED_TOKENS, CostConvention, PriceRegistry

REQUIRED_COLUMNS = ("query_id", "model", "score")
OPTIONAL_COLUMNS = ("dataset", "task", "prompt", "cost_usd", "in_tokens", "out_tokens", "split", "contaminated")
SPLITS = ("train", "test")
DEFAULT_TRAIN_FRACTION = 0.7


@dataclass
class QueryDataset:
    """Recorded outcomes of M models on Q queries (``score_QM``, ``cost_QM`` in US dollars)."""

    name: str
    models: list[str]
    query_ids: np.ndarray
    prompts: list[str]
    tasks: np.ndarray
    split: np.ndarray
    score_QM: np.ndarray
    cost_QM: np.ndarray
    in_tokens_QM: np.ndarray
    out_tokens_QM: np.ndarray
    contaminated: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return int(self.score_QM.shape[0])

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def cost_convention(self) -> str:
        return str(self.meta.get("cost_convention", MEASURED_TOKENS))

    def subset(self, mask: np.ndarray, name: str | None = None) -> QueryDataset:
        """The queries where ``mask`` (bool of length Q, or indices) selects them."""
        index = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=np.int64)
        return replace(
            self, name=name or self.name, query_ids=self.query_ids[index], prompts=[self.prompts[i] for i in index],
            tasks=self.tasks[index], split=self.split[index], score_QM=self.score_QM[index], cost_QM=self.cost_QM[index],
            in_tokens_QM=self.in_tokens_QM[index], out_tokens_QM=self.out_tokens_QM[index],
            contaminated=self.contaminated[index],
        )

    def part(self, split: str) -> QueryDataset:
        """The ``train`` or ``test`` queries."""
        if split not in SPLITS:
            raise InputError(f"split={split!r} must be one of {SPLITS}.")
        selected = self.split == split
        if not selected.any():
            raise InputError(f"dataset {self.name!r} has no {split!r} queries; give a split column with both values.")
        return self.subset(selected)

    def decontaminated(self) -> QueryDataset:
        """Without the prompts flagged as contaminated (RouteLLM evaluates without them)."""
        return self.subset(~self.contaminated)

    def mean_scores(self) -> np.ndarray:
        return self.score_QM.mean(axis=0)

    def mean_costs(self) -> np.ndarray:
        return self.cost_QM.mean(axis=0)

    def strong_weak(self) -> tuple[int, int]:
        """For two models: (strong, weak) indices; strong = the higher mean score on these queries."""
        if self.num_models != 2:
            raise InputError(f"strong/weak needs exactly 2 models, dataset {self.name!r} has {self.num_models}.")
        means = self.mean_scores()
        strong = int(np.argmax(means))
        return strong, 1 - strong

    def to_long(self) -> pa.Table:
        """The long table, one row per (query, model)."""
        Q, M = self.score_QM.shape
        q_idx = np.repeat(np.arange(Q), M)
        m_idx = np.tile(np.arange(M), Q)

        def tokens(values: np.ndarray) -> pa.Array:
            flat = values.reshape(-1)
            return pa.array(np.where(np.isnan(flat), 0, flat).astype(np.int64), mask=np.isnan(flat))

        return pa.table({
            "query_id": pa.array(self.query_ids[q_idx].astype(str)),
            "dataset": pa.array([self.name] * (Q * M)),
            "task": pa.array(self.tasks[q_idx].astype(str)),
            "prompt": pa.array([self.prompts[i] for i in q_idx]),
            "model": pa.array([self.models[j] for j in m_idx]),
            "score": pa.array(self.score_QM.reshape(-1)),
            "cost_usd": pa.array(self.cost_QM.reshape(-1)),
            "in_tokens": tokens(self.in_tokens_QM),
            "out_tokens": tokens(self.out_tokens_QM),
            "split": pa.array(self.split[q_idx].astype(str)),
            "contaminated": pa.array(self.contaminated[q_idx]),
        })

    @classmethod
    def from_long(
        cls,
        table: pa.Table,
        *,
        name: str | None = None,
        prices: PriceRegistry | None = None,
        cost_convention: CostConvention | None = None,
        meta: dict[str, Any] | None = None,
        where: str = "table",
    ) -> QueryDataset:
        """Validate a long table and pivot it to query x model arrays.

        Cost: the ``cost_usd`` column when present; else ``in_tokens``/``out_tokens`` priced by
        ``prices`` (strict: an unpriced model is an error); else ``cost_convention``'s nominal
        token counts priced the same way. No cost at all is an error, never $0.
        """
        meta = dict(meta or {})
        raw = table.schema.metadata or {}
        if b"routelab.queries" in raw:
            meta = {**json.loads(raw[b"routelab.queries"]), **meta}
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise InputError(
                f"{where} lacks the column(s) {missing}; a query-routing table needs one row per (query, model) with "
                f"columns {list(REQUIRED_COLUMNS)} and optionally {list(OPTIONAL_COLUMNS)}."
            )
        if table.num_rows == 0:
            raise InputError(f"{where} has no rows.")
        query_col = np.asarray(table.column("query_id").cast(pa.string()).to_pylist(), dtype=object)
        model_col = np.asarray(table.column("model").cast(pa.string()).to_pylist(), dtype=object)
        if any(v is None for v in query_col) or any(v is None for v in model_col):
            raise InputError(f"{where}: query_id and model must not be empty.")
        query_ids, q_idx = np.unique(query_col, return_inverse=True)
        first_seen = np.full(len(query_ids), len(query_col))
        np.minimum.at(first_seen, q_idx, np.arange(len(query_col)))
        order = np.argsort(first_seen, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        q_idx, query_ids = rank[q_idx], query_ids[order]
        models, m_first = [], {}
        for m in model_col:
            if m not in m_first:
                m_first[m] = len(models)
                models.append(m)
        m_idx = np.array([m_first[m] for m in model_col])
        Q, M = len(query_ids), len(models)
        if M < 2:
            raise InputError(f"{where} has only {M} model ({models}); routing needs at least 2.")
        seen = np.zeros((Q, M), dtype=np.int64)
        np.add.at(seen, (q_idx, m_idx), 1)
        if (seen > 1).any():
            q, m = np.argwhere(seen > 1)[0]
            raise InputError(f"{where}: query {query_ids[q]!r} has {seen[q, m]} rows for model {models[m]!r}; "
                             "each (query, model) pair must appear once.")
        if (seen == 0).any():
            q, m = np.argwhere(seen == 0)[0]
            raise InputError(f"{where}: query {query_ids[q]!r} has no row for model {models[m]!r}; every query needs "
                             f"an outcome for every model ({Q} queries x {M} models, {table.num_rows} rows).")

        def numeric(column: str) -> np.ndarray | None:
            if column not in table.column_names:
                return None
            values = table.column(column)
            try:
                values = values.cast(pa.float64())
            except pa.ArrowException:  # not a number, or a type arrow cannot cast to float
                raise InputError(f"{where}: column {column!r} must be numeric.") from None
            out = np.full((Q, M), np.nan)
            out[q_idx, m_idx] = values.to_numpy(zero_copy_only=False)
            return out

        score = numeric("score")
        if not np.isfinite(score).all():
            q, m = np.argwhere(~np.isfinite(score))[0]
            raise InputError(f"{where}: score of query {query_ids[q]!r}, model {models[m]!r} is missing or not finite.")
        in_tok, out_tok = numeric("in_tokens"), numeric("out_tokens")
        in_tok = np.full((Q, M), np.nan) if in_tok is None else in_tok
        out_tok = np.full((Q, M), np.nan) if out_tok is None else out_tok
        cost = numeric("cost_usd")
        if cost is None or np.isnan(cost).any():
            cost = cls._priced(cost, in_tok, out_tok, models, prices, cost_convention, meta, where, query_ids)
        if not np.isfinite(cost).all() or (cost < 0).any():
            raise InputError(f"{where}: cost_usd must be finite and >= 0.")

        def per_query(column: str, default: Any) -> np.ndarray:
            out = np.empty(Q, dtype=object)
            if column not in table.column_names:
                out[:] = default
                return out
            values = table.column(column).to_pylist()
            out[q_idx] = values
            if any(v is None for v in out):
                raise InputError(f"{where}: column {column!r} has empty values.")
            return out

        split = per_query("split", None) if "split" in table.column_names else default_split(Q)
        split = split.astype(str)
        bad = sorted(set(split.tolist()) - set(SPLITS))
        if bad:
            raise InputError(f"{where}: split values {bad} are not 'train' or 'test'.")
        prompts = [str(p) for p in per_query("prompt", "")]  # not astype(str): fixed-width copies of long text
        tasks = per_query("task", "all").astype(str)
        contaminated = per_query("contaminated", False).astype(bool)
        if name is None:
            names = sorted(set(table.column("dataset").to_pylist())) if "dataset" in table.column_names else []
            name = names[0] if len(names) == 1 else "custom"
        return cls(name=name, models=models, query_ids=query_ids.astype(str), prompts=prompts, tasks=tasks, split=split,
                   score_QM=score, cost_QM=cost, in_tokens_QM=in_tok, out_tokens_QM=out_tok,
                   contaminated=contaminated, meta=meta)

    @staticmethod
    def _priced(cost, in_tok, out_tok, models, prices, convention, meta, where, query_ids) -> np.ndarray:
        """Cost from tokens x registry prices (or a nominal-token convention) where cost_usd is missing."""
        registry = prices or PriceRegistry()
        out = np.full(in_tok.shape, np.nan) if cost is None else cost.copy()
        need = np.isnan(out)
        have_tokens = ~np.isnan(in_tok) & ~np.isnan(out_tok)
        for j, model in enumerate(models):
            rows = need[:, j]
            if not rows.any():
                continue
            registry.price(model)  # strict: raises for an unpriced model
            measured = rows & have_tokens[:, j]
            out[measured, j] = registry.cost(model, in_tok[measured, j], out_tok[measured, j])
            rest = rows & ~have_tokens[:, j]
            if rest.any():
                if convention is None:
                    q = np.flatnonzero(rest)[0]
                    raise InputError(
                        f"{where}: query {query_ids[q]!r}, model {model!r} has neither cost_usd nor in_tokens/out_tokens; "
                        "give one of them or a cost convention (nominal tokens per query). Cost is never assumed $0."
                    )
                out[rest, j] = registry.cost(model, convention.in_tokens, convention.out_tokens)
                meta["cost_convention"] = str(convention)
        return out


def default_split(num_queries: int, train_fraction: float = DEFAULT_TRAIN_FRACTION, seed: int = 0) -> np.ndarray:
    """A fixed train/test split by a seeded permutation (used when a table has no split column)."""
    order = np.random.default_rng(seed).permutation(num_queries)
    split = np.full(num_queries, "test", dtype=object)
    split[order[: int(round(train_fraction * num_queries))]] = "train"
    return split

