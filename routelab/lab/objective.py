"""The training objective of a lab run: next-token prediction, or masked diffusion.

``training_forward`` and ``evaluation_forward`` are what the training loop and the
validation call; they dispatch on ``model.config.objective``. For masked diffusion
(``routelab.models.masked_diffusion``) the masks of a training step are a function of
(seed, step, micro-batch), so resumed runs stay exact, and the masks of validation batch
``i`` are a function of ``i`` alone, so every evaluation and every router of a comparison
is scored on the same noised inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routelab.lab.batches import Batch
from routelab.models.masked_diffusion import generator_for, masked_diffusion_forward

EVAL_MASK_KEY = 1_000_003  # separates validation masks from training masks
PROBE_INDEX = 1_000_000


def is_diffusion(model: torch.nn.Module) -> bool:
    return getattr(model.config, "objective", "causal") == "masked-diffusion"


def training_forward(model: torch.nn.Module, batch: Batch, *, seed: int, step: int, micro: int):  # noqa: ANN201
    """The model output of one training micro-batch, with its ``loss``."""
    if is_diffusion(model):
        out, _ = masked_diffusion_forward(model, batch.inputs, generator_for(seed, step, micro))
        return out
    return model(batch.inputs, batch.targets)


def evaluation_forward(model: torch.nn.Module, batch: Batch, index: int):  # noqa: ANN201
    """``(output, token_loss [B*S])`` of validation batch ``index``: next-token cross-entropy,
    or the masked-diffusion ELBO terms (their mean is the diffusion loss)."""
    if is_diffusion(model):
        out, terms_BS = masked_diffusion_forward(model, batch.inputs, generator_for(EVAL_MASK_KEY, index))
        return out, terms_BS.flatten()
    out = model(batch.inputs)
    return out, F.cross_entropy(out.logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
