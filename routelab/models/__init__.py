"""Models with pluggable routing: TinyLM (a small decoder-only transformer)."""

from routelab.models.tinylm import TinyLM, TinyLMConfig, TinyLMOutput

__all__ = ["TinyLM", "TinyLMConfig", "TinyLMOutput"]
