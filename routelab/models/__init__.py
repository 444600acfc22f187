"""Models: TinyLM and adapters for pretrained models (``routelab.models.hf``)."""
