"""Models: TinyLM (a small decoder-only transformer with pluggable routing) and adapters for
pretrained models (``routelab.models.hf``)."""

from routelab.models.tinylm import TinyLM, TinyLMConfig, TinyLMOutput

__all__ = ["TinyLM", "TinyLMConfig", "TinyLMOutput"]
