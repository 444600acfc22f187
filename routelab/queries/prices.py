"""The strict price registry: a model with no price is an error, never $0.

Cost of one call = ``in_tokens * input_price + out_tokens * output_price`` with prices in US
dollars per million tokens. Where a dataset records no token counts, its cost convention
(``CostConvention``) supplies nominal counts per query and says so in every report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from routelab.core.errors import ConfigError, InputError, suggest


@dataclass(frozen=True)
class Price:
    """List price of one model in US dollars per million input / output tokens, with its source."""

    input_per_million: float
    output_per_million: float
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("input_per_million", "output_per_million"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ConfigError(f"Price.{name} must be a finite number >= 0, got {value!r}.")


@dataclass(frozen=True)
class CostConvention:
    """How a dataset's per-query cost was computed when it has no measured token counts."""

    in_tokens: float
    out_tokens: float
    description: str

    def __str__(self) -> str:
        return self.description


MEASURED_TOKENS = "cost = measured input/output tokens x list price per token"

ROUTELLM_APPENDIX_D = CostConvention(
    95, 264,
    "no token counts recorded: every query costs 95 input + 264 output tokens at list price "
    "(the average prompt/response lengths of RouteLLM, arXiv 2406.18665, appendix D)",
)

_ROUTELLM = "RouteLLM (arXiv 2406.18665) appendix D"
_LLMROUTER = "LLMRouter data/example_data/llm_candidates/default_llm.json"
_ROUTERARENA = "RouterArena model_cost/cost.json"

DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4-1106-preview": Price(10.0, 30.0, _ROUTELLM),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": Price(0.24, 0.24, _ROUTELLM),
    "qwen2.5-7b-instruct": Price(0.20, 0.20, _LLMROUTER),
    "codegemma-7b": Price(0.20, 0.20, _LLMROUTER),
    "gemma-2-9b-it": Price(0.10, 0.10, _LLMROUTER),
    "llama-3.1-8b-instruct": Price(0.20, 0.20, _LLMROUTER),
    "llama3-chatqa-1.5-8b": Price(0.20, 0.20, _LLMROUTER),
    "mistral-7b-instruct-v0.3": Price(0.20, 0.20, _LLMROUTER),
    "llama-3.3-nemotron-super-49b-v1": Price(0.90, 0.90, _LLMROUTER),
    "llama-3.1-nemotron-51b-instruct": Price(0.90, 0.90, _LLMROUTER),
    "llama3-chatqa-1.5-70b": Price(0.90, 0.90, _LLMROUTER),
    "claude-3-haiku-20240307": Price(0.25, 1.25, _ROUTERARENA),
    "gemini-2.0-flash-001": Price(0.10, 0.40, _ROUTERARENA),
}


class PriceRegistry:
    """Model name -> ``Price``. Looking up a model that has no price raises ``InputError``."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices: dict[str, Price] = dict(DEFAULT_PRICES if prices is None else prices)

    def add(self, model: str, input_per_million: float, output_per_million: float, source: str = "") -> None:
        self._prices[model] = Price(float(input_per_million), float(output_per_million), source)

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def models(self) -> list[str]:
        return sorted(self._prices)

    def price(self, model: str) -> Price:
        if model not in self._prices:
            raise InputError(
                f"model {model!r} has no price in the registry.{suggest(model, self._prices)} A model without a "
                "price would silently cost $0; add one with PriceRegistry.add(model, input_per_million, "
                "output_per_million) or give a cost_usd column."
            )
        return self._prices[model]

    def require(self, models: Iterable[str]) -> None:
        """Raise ``InputError`` naming every model without a price."""
        missing = sorted({m for m in models if m not in self._prices})
        if missing:
            raise InputError(
                f"models without a price: {missing}. A model without a price would silently cost $0; add "
                "each with PriceRegistry.add(model, input_per_million, output_per_million) or give cost_usd."
            )

    def cost(self, model: str, in_tokens: np.ndarray | float, out_tokens: np.ndarray | float) -> np.ndarray:
        """US dollars of calls to ``model`` with these token counts (arrays broadcast)."""
        price = self.price(model)
        in_tokens = np.asarray(in_tokens, dtype=np.float64)
        out_tokens = np.asarray(out_tokens, dtype=np.float64)
        if np.any(~np.isfinite(in_tokens)) or np.any(~np.isfinite(out_tokens)) or np.any(in_tokens < 0) \
                or np.any(out_tokens < 0):
            raise InputError(f"token counts of {model!r} must be finite and >= 0.")
        return (in_tokens * price.input_per_million + out_tokens * price.output_per_million) / 1e6
