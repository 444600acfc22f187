"""Masked diffusion language modelling with TinyLM (absorbing-state discrete diffusion).

As in MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models",
arXiv 2406.07524) and LLaDA (Nie et al. 2025, "Large Language Diffusion Models", arXiv
2502.09992): every sequence ``b`` draws a time ``t_b ~ U[0, 1]`` and masks each of its
tokens independently with probability ``p_b = (1 - eps) t_b + eps``; a bidirectional
TinyLM (``objective='masked-diffusion'``) predicts the clean tokens at the masked
positions. The loss is the ELBO of the linear schedule,

    L = 1 / (B L) * sum_b sum_i 1[x_t^{b,i} = MASK] * (-log p(x_0^{b,i} | x_t^b)) / p_b

(LLaDA eq. 3; MDLM's weight for the linear schedule), an upper bound on the negative
log-likelihood per token. The mask ratio ``p_b`` is the diffusion timestep that routers
receive as ``RoutingContext.timestep`` (EC-DLM sets expert capacity from it).

Masks come from an explicit ``torch.Generator``, so a training step (seeded by run seed,
step and micro-batch) and every validation batch (seeded by its index) are reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from routelab.core.errors import ConfigError

MASK_EPS = 1e-3


def generator_for(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative integers (e.g. seed, step, micro)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def mask_tokens(
    x0_BS: torch.Tensor, mask_token_id: int, generator: torch.Generator, *, eps: float = MASK_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward process: ``(x_t, masked, p)``.

    ``p_B = (1 - eps) t + eps`` with ``t ~ U[0, 1]`` per sequence; ``masked_BS`` is True where
    the token was replaced by ``mask_token_id``.
    """
    batch, seq = x0_BS.shape
    t_B = torch.rand(batch, generator=generator)
    p_B = (1 - eps) * t_B + eps
    masked_BS = torch.rand(batch, seq, generator=generator) < p_B[:, None]
    xt_BS = torch.where(masked_BS, torch.full_like(x0_BS, mask_token_id), x0_BS)
    return xt_BS, masked_BS, p_B


def token_losses(
    logits_BSV: torch.Tensor, x0_BS: torch.Tensor, masked_BS: torch.Tensor, p_B: torch.Tensor
) -> torch.Tensor:
    """``[B, S]`` ELBO terms: ``-log p(x0 | x_t) / p_b`` at masked positions, 0 elsewhere.

    Their mean over all positions is the diffusion loss (an NLL bound in nats per token).
    """
    ce_BS = F.cross_entropy(logits_BSV.float().flatten(0, 1), x0_BS.flatten(), reduction="none").view_as(x0_BS)
    return torch.where(masked_BS, ce_BS / p_B[:, None].to(ce_BS.dtype), torch.zeros_like(ce_BS))


def masked_diffusion_forward(model: torch.nn.Module, x0_BS: torch.Tensor, generator: torch.Generator):  # noqa: ANN201
    """Mask ``x0``, run ``model`` with the mask ratios as timestep, and return its output with
    ``lm_loss`` = the diffusion loss and ``loss = lm_loss + aux_loss``, plus the ``[B, S]``
    per-position loss terms."""
    config = model.config
    if config.mask_token_id is None:
        raise ConfigError("masked diffusion needs a TinyLM with objective='masked-diffusion' "
                          "(bidirectional, with a mask token).")
    xt_BS, masked_BS, p_B = mask_tokens(x0_BS, config.mask_token_id, generator)
    out = model(xt_BS, timestep=p_B)
    terms_BS = token_losses(out.logits, x0_BS, masked_BS, p_B)
    lm_loss = terms_BS.mean()
    return dataclasses.replace(out, loss=lm_loss + out.aux_loss, lm_loss=lm_loss), terms_BS
