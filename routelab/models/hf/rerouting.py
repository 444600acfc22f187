"""Test-time rerouting: "Rewiring Experts on the Fly" (arXiv 2510.14853).

An additive router-logit vector ``delta_l`` (``[E]``, or ``[B, E]``: one per request of
the batch) on each selected MoE layer, ``z'_t = z_t + delta_l``, initialised to 0 and
optimised with the model frozen on the self-supervised next-token cross-entropy of the
context that is already available: the prompt at prefill, then prompt + generated text
every ``interval`` generated tokens. ``delta`` gets gradient through the gate values only;
the top-k choice follows once the accumulated shifts reorder the logits.

[recon] (no code released): the number of steps, the learning rate (Adam) and the layer
selection rule. By default the ``layer_ratio`` of MoE layers with the most decisive
routing on the context are selected: highest mean max-probability of ``softmax(z)``
(``confidence="max_prob"``) or lowest mean normalised entropy (``confidence="entropy"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_non_negative, check_positive_int, check_probability
from routelab.models.hf.attach import RoutingHandle
from routelab.models.hf.observe import RouterCall
from routelab.models.hf.routers import LogitOffset, add_logit_offset, remove_offset

OFFSET_NAME = "rerouting"
CONFIDENCE_RULES = ("max_prob", "entropy")


@dataclass
class RerouteConfig:
    """Options of test-time rerouting.

    Attributes:
        layers: decoder-layer indices to reroute; None selects them by routing confidence.
        layer_ratio: fraction of the MoE layers selected when ``layers`` is None [recon].
        confidence: ``max_prob`` or ``entropy`` (see the module docstring) [recon].
        steps: optimisation steps per fit [recon].
        lr: Adam learning rate for ``delta`` [recon].
        interval: re-fit every ``interval`` generated tokens (the paper's m = 128).
        per_request: one ``delta`` per sequence of the batch (else one shared by all).
    """

    layers: list[int] | None = None
    layer_ratio: float = 0.25
    confidence: str = "max_prob"
    steps: int = 10
    lr: float = 5e-2
    interval: int = 128
    per_request: bool = True

    def validate(self) -> RerouteConfig:
        check_probability("layer_ratio", self.layer_ratio, open_low=True)
        check_choice("confidence", self.confidence, CONFIDENCE_RULES)
        check_positive_int("steps", self.steps, minimum=0)
        check_non_negative("lr", self.lr)
        check_positive_int("interval", self.interval)
        return self


def next_token_loss(logits_BSV: torch.Tensor, input_ids: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of the mean next-token cross-entropy of each sequence's real tokens.

    A sum of per-sequence means, so a per-request ``delta`` is fitted to its own sequence.
    """
    logits_BSV = logits_BSV if logits_BSV.dtype == torch.float64 else logits_BSV.float()
    pair_BS = (mask_BS[:, 1:] & mask_BS[:, :-1]).to(logits_BSV.dtype)
    ce_BS = F.cross_entropy(
        logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view_as(pair_BS)
    per_seq_B = (ce_BS * pair_BS).sum(dim=1) / pair_BS.sum(dim=1).clamp_min(1.0)
    return per_seq_B.sum()


class _Confidence:
    """Mean max-probability and mean normalised entropy of ``softmax(z)`` per MoE layer."""

    def __init__(self, num_layers: int) -> None:
        self.max_prob = torch.zeros(num_layers, dtype=torch.float64)
        self.entropy = torch.zeros(num_layers, dtype=torch.float64)

    def on_router_call(self, call: RouterCall) -> None:
        probs_TE = torch.softmax(call.logits_TE.detach().float(), dim=-1)
        if probs_TE.shape[0] == 0:
            return
        num_experts = probs_TE.shape[1]
        entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(dim=-1) / math.log(max(num_experts, 2))
        self.max_prob[call.layer] = float(probs_TE.max(dim=-1).values.mean())
        self.entropy[call.layer] = float(entropy_T.mean())


class Rerouter:
    """Fit and apply per-layer router-logit offsets at test time (Rewiring Experts on the Fly).

    Args:
        handle: an attached ``RoutingHandle``; layers still on the model's own router get
            the native routelab router (bit-identical while ``delta`` is 0).
        config: a ``RerouteConfig``; keyword arguments override its fields.
    """

    def __init__(self, handle: RoutingHandle, config: RerouteConfig | None = None, **overrides: object) -> None:
        config = config or RerouteConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ConfigError(f"Rerouter has no option {key!r}; options: {sorted(vars(config))}.")
            setattr(config, key, value)
        self.config = config.validate()
        self.handle = handle
        self.layers: list[int] = []
        self.losses: list[list[float]] = []  # the context loss at every step of every fit
        self._deltas: dict[int, LogitOffset] = {}
        self._batch_size: int | None = None

    # -------------------------------------------------------------- layer choice

    def select_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
        """The configured layers, or the ``layer_ratio`` most confidently routed ones on this context."""
        if self.config.layers is not None:
            return self.handle.resolve_layers(self.config.layers)
        confidence = _Confidence(self.handle.num_moe_layers)
        self.handle.add_observer(confidence)
        try:
            with torch.no_grad():
                self.handle.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self.handle.remove_observer(confidence)
        score = confidence.max_prob if self.config.confidence == "max_prob" else -confidence.entropy
        count = max(1, round(self.config.layer_ratio * self.handle.num_moe_layers))
        order = sorted(range(self.handle.num_moe_layers), key=lambda i: (-float(score[i]), i))[:count]
        return [self.handle.moe_layers[i] for i in sorted(order)]

    # -------------------------------------------------------------- deltas

    def deltas(self) -> dict[int, torch.Tensor]:
        """The current ``delta`` of every rerouted layer (``[E]`` or ``[B, E]``)."""
        return {layer: offset.offset for layer, offset in self._deltas.items()}

    def _install(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if self._deltas:
            if self.config.per_request and input_ids.shape[0] != self._batch_size:
                raise InputError(
                    f"the per-request offsets were fitted for {self._batch_size} requests, got a batch of "
                    f"{input_ids.shape[0]}; call reset() before rerouting a different batch."
                )
            return
        self.layers = self.select_layers(input_ids, attention_mask)
        self._batch_size = int(input_ids.shape[0])
        shape = (self._batch_size, self.handle.num_experts) if self.config.per_request else (self.handle.num_experts,)
        routers = self.handle.ensure_routelab(self.layers)
        for layer, router in routers.items():
            self._deltas[layer] = add_logit_offset(router, OFFSET_NAME, torch.zeros(shape), trainable=True)

    def reset(self) -> None:
        """Remove the offsets (and the native routers put in for them)."""
        for layer in self._deltas:
            router = self.handle.routelab_router(layer)
            if router is not None:
                remove_offset(router, OFFSET_NAME)
        if self._deltas and self.handle.attached:
            self.handle.release(list(self._deltas))
        self._deltas, self.layers, self._batch_size = {}, [], None

    # -------------------------------------------------------------- fitting

    def fit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
        """Optimise ``delta`` on the next-token loss of this context for ``steps`` steps.

        Returns the context loss before each step (and after the last one).
        """
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self._install(input_ids, attention_mask)
        params = [offset.offset for offset in self._deltas.values()]
        model = self.handle.model
        frozen = [(p, p.requires_grad) for p in model.parameters() if not any(p is q for q in params)]
        for p, _ in frozen:
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(params, lr=self.config.lr)
        history: list[float] = []
        try:
            with torch.enable_grad():
                for step in range(self.config.steps + 1):
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                    loss = next_token_loss(logits, input_ids, mask)
                    history.append(float(loss.detach()))
                    if step == self.config.steps:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            for p in params:
                p.grad = None
        self.losses.append(history)
        return history

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        **generate_kwargs: object,
    ) -> torch.Tensor:
        """Fit on the prompt, then generate, re-fitting on the extended context every ``interval`` tokens.

        Each chunk is generated by ``model.generate`` from the whole context (the cache is
        not carried across re-fits, since the routing of the context changes).
        """
        check_positive_int("max_new_tokens", max_new_tokens)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.fit(input_ids, mask)
        eos_ids, pad_id = self._special_ids(input_ids.device)
        done_B = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        produced = 0
        while produced < max_new_tokens:
            chunk = min(self.config.interval, max_new_tokens - produced)
            with torch.no_grad():
                out = self.handle.model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=chunk, **generate_kwargs
                )
            new_BN = out[:, input_ids.shape[1]:].clone()
            real_BN = torch.ones_like(new_BN, dtype=torch.bool)
            if eos_ids is not None:  # tokens after a sequence's first end-of-sequence are padding
                is_eos_BN = torch.isin(new_BN, eos_ids).long()
                real_BN = ((is_eos_BN.cumsum(dim=1) - is_eos_BN) == 0) & ~done_B.unsqueeze(1)
                done_B |= is_eos_BN.bool().any(dim=1)
                new_BN = new_BN.masked_fill(~real_BN, pad_id)
            input_ids = torch.cat([input_ids, new_BN], dim=1)
            mask = torch.cat([mask, real_BN.to(mask.dtype)], dim=1)
            produced += new_BN.shape[1]
            if new_BN.shape[1] < chunk or bool(done_B.all()):
                break
            if produced < max_new_tokens:
                self.fit(input_ids, mask)
        return input_ids

    def _special_ids(self, device: torch.device) -> tuple[torch.Tensor | None, int]:
        config = getattr(self.handle.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            return None, 0
        eos_list = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        pad = getattr(config, "pad_token_id", None)
        return torch.tensor(eos_list, device=device), int(eos_list[0] if pad is None else pad)
