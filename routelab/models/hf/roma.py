"""Router fine-tuning with Routing Manifold Alignment (RoMA).

RoMA (repo ``Koios1143/RoMA``, ``finetune_roma.py``) trains only the routers of the last
MoE layers with the task loss plus a manifold regulariser that pulls a sample's routing
towards the routing of its successful neighbours in a task-embedding space:

* routing vector ``r`` = the concatenated routing weights of the last prompt token in the
  target layers, each layer's weights renormalised to sum to 1 (``[L*E]``);
* neighbours = the ``k`` (5) nearest successful samples (ones the base model got right)
  by cosine similarity of task embeddings, weighted
  ``W_ij = exp(-(1 - cos_ij)^2 / (2 sigma^2))`` (sigma 0.4), normalised over the k;
* ``L = task + lambda(t) * (1/B) sum_i sum_j W_ij ||r_i - r_j||^2``, lambda = 0.8 warmed
  up linearly over 2000 steps; AdamW, lr 7e-5, weight decay 0.01.

The published code reads ``r_i`` from precomputed JSON, so its regulariser has no
gradient. Here ``r_i`` is computed live from the router forward of the same step (with
grad); only the neighbours' ``r_j`` are constants from the frozen base model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_non_negative, check_positive_int
from routelab.models.hf.attach import RoutingHandle
from routelab.models.hf.observe import RouterCall

EmbedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def neighbour_weights(cos_BK: torch.Tensor, sigma: float = 0.4) -> torch.Tensor:
    """``W_ij = exp(-(1 - cos_ij)^2 / (2 sigma^2))`` normalised over the neighbours (last dim)."""
    if sigma <= 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}.")
    raw_BK = torch.exp(-((1.0 - cos_BK) ** 2) / (2.0 * sigma**2))
    return raw_BK / raw_BK.sum(dim=-1, keepdim=True)


def manifold_regulariser(r_BF: torch.Tensor, neighbours_BJF: torch.Tensor, weights_BJ: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i sum_j W_ij ||r_i - r_j||^2``."""
    sq_BJ = ((r_BF.unsqueeze(1) - neighbours_BJF) ** 2).sum(dim=-1)
    return (weights_BJ * sq_BJ).sum(dim=-1).mean()


class RoutingVectorCapture:
    """Observer collecting, live and with grad, the routing vector of the last real token of each sequence."""

    def __init__(self, layers: Sequence[int], num_experts: int) -> None:
        self.layers = list(layers)
        self.num_experts = num_experts
        self.per_layer: dict[int, torch.Tensor] = {}

    def on_router_call(self, call: RouterCall) -> None:
        if call.model_layer not in self.layers:
            return
        seq_T = call.tokens.token_batch().seq_id_T
        num_seqs = call.tokens.batch_size
        last_B = torch.full((num_seqs,), -1, dtype=torch.long, device=seq_T.device)
        last_B.scatter_reduce_(0, seq_T, torch.arange(seq_T.numel(), device=seq_T.device), reduce="amax")
        if bool((last_B < 0).any()):
            raise InputError("every sequence needs at least one real token to have a routing vector.")
        idx_BK = call.topk_idx_TK.index_select(0, last_B)
        weight_BK = call.topk_weight_TK.index_select(0, last_B)
        weight_BK = weight_BK if weight_BK.dtype == torch.float64 else weight_BK.float()
        valid_BK = idx_BK >= 0
        weight_BK = torch.where(valid_BK, weight_BK, torch.zeros_like(weight_BK))
        dense_BE = weight_BK.new_zeros(num_seqs, self.num_experts).scatter_add(1, idx_BK.clamp_min(0), weight_BK)
        self.per_layer[call.model_layer] = dense_BE / dense_BE.sum(dim=1, keepdim=True).clamp_min(1e-20)

    def vector(self) -> torch.Tensor:
        """``[B, L*E]`` in the order of ``layers``."""
        missing = [layer for layer in self.layers if layer not in self.per_layer]
        if missing:
            raise InputError(f"no routing was seen for layers {missing}; run a model forward first.")
        return torch.cat([self.per_layer[layer] for layer in self.layers], dim=1)


def routing_vectors(
    handle: RoutingHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: Sequence[int]
) -> torch.Tensor:
    """Routing vectors ``[B, L*E]`` of a batch under the current routers, without grad."""
    capture = RoutingVectorCapture(layers, handle.num_experts)
    handle.add_observer(capture)
    try:
        with torch.no_grad():
            handle.model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove_observer(capture)
    return capture.vector()


def mean_token_embedding(model: nn.Module) -> EmbedFn:
    """A task embedding without a sentence encoder: the mean input embedding of the real tokens."""
    table = model.get_input_embeddings()

    def embed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            vectors_BSD = table(input_ids).float()
            mask_BS1 = attention_mask.unsqueeze(-1).float()
            return (vectors_BSD * mask_BS1).sum(dim=1) / mask_BS1.sum(dim=1).clamp_min(1.0)

    return embed


@dataclass
class SuccessfulSet:
    """The successful samples: unit task embeddings ``[N, D]`` and base-model routing vectors ``[N, F]``."""

    embeddings: torch.Tensor
    routing: torch.Tensor

    @classmethod
    def build(
        cls,
        handle: RoutingHandle,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        embed: EmbedFn,
        layers: Sequence[int],
    ) -> SuccessfulSet:
        """Embed the successful samples and record their routing with the current (base) routers."""
        if not batches:
            raise InputError("the successful set is empty; RoMA needs samples the base model solved.")
        embeddings, routing = [], []
        for input_ids, mask in batches:
            embeddings.append(F.normalize(embed(input_ids, mask).float(), dim=-1))
            routing.append(routing_vectors(handle, input_ids, mask, layers))
        return cls(torch.cat(embeddings), torch.cat(routing).detach())

    def neighbours(
        self, query_BD: torch.Tensor, k: int, sigma: float, exclude_B: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most cosine-similar successful samples: routing ``[B, k, F]`` and weights ``[B, k]``."""
        cos_BN = F.normalize(query_BD.float(), dim=-1) @ self.embeddings.T
        if exclude_B is not None:
            rows = torch.nonzero(exclude_B >= 0).squeeze(1)
            cos_BN[rows, exclude_B[rows]] = float("-inf")
        available = self.embeddings.shape[0] - (0 if exclude_B is None else 1)
        if k > available:
            raise ConfigError(f"k={k} neighbours requested but the successful set has only {available} candidates.")
        cos_BK, index_BK = cos_BN.topk(k, dim=-1)
        return self.routing[index_BK], neighbour_weights(cos_BK, sigma)


class RomaTrainer:
    """Train only the routers of ``layers`` with task loss + RoMA regulariser (see module docstring).

    Every other parameter is frozen for the trainer's lifetime (``close()`` or the
    context manager restores ``requires_grad``); the optimiser holds the router
    parameters only.

    Args:
        handle: an attached ``RoutingHandle``.
        successful: the ``SuccessfulSet`` (neighbour routing from the frozen base model).
        embed: task-embedding function ``(input_ids, attention_mask) -> [B, D]``.
        layers: decoder layers whose routers train (default: the last 5 MoE layers).
        k, sigma, lam, warmup_steps, lr, weight_decay: RoMA's hyper-parameters.
        task_loss: ``(outputs, labels) -> loss``; default the model's own LM loss on ``labels``.
    """

    def __init__(
        self,
        handle: RoutingHandle,
        successful: SuccessfulSet,
        embed: EmbedFn,
        *,
        layers: Sequence[int] | None = None,
        k: int = 5,
        sigma: float = 0.4,
        lam: float = 0.8,
        warmup_steps: int = 2000,
        lr: float = 7e-5,
        weight_decay: float = 0.01,
        task_loss: Callable[[object, torch.Tensor | None], torch.Tensor] | None = None,
    ) -> None:
        self.handle = handle
        self.layers = handle.resolve_layers(list(layers)) if layers is not None else handle.moe_layers[-5:]
        self.successful = successful
        self.embed = embed
        self.k = check_positive_int("k", k)
        self.sigma = float(sigma)
        self.lam = check_non_negative("lam", lam)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.task_loss = task_loss
        expected = len(self.layers) * handle.num_experts
        if successful.routing.shape[1] != expected:
            raise ConfigError(
                f"the successful set has routing vectors of size {successful.routing.shape[1]} but {len(self.layers)} "
                f"layers x {handle.num_experts} experts = {expected}; build it with the same layers."
            )
        self.parameters = self.router_parameters()
        ids = {id(p) for p in self.parameters}
        self._flags = [(p, p.requires_grad) for p in handle.model.parameters()]
        for p in handle.model.parameters():
            p.requires_grad_(id(p) in ids)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.steps_done = 0
        self._capture = RoutingVectorCapture(self.layers, handle.num_experts)
        handle.add_observer(self._capture)

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters of the routers now in place in the target layers."""
        params: list[nn.Parameter] = []
        for layer in self.layers:
            params.extend(p for p in self.handle.current_router(layer).parameters())
        if not params:
            raise ConfigError(f"the routers of layers {self.layers} have no parameters to train.")
        return params

    def lam_at(self, step: int) -> float:
        """``lambda(t)``: linear warm-up to ``lam`` over ``warmup_steps`` (step 1 is the first)."""
        return self.lam * min(1.0, step / self.warmup_steps)

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        exclude: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One optimiser step on a batch; ``exclude[i]`` is the successful-set index of sample i (or -1)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        neighbours_BJF, weights_BJ = self.successful.neighbours(self.embed(input_ids, mask), self.k, self.sigma, exclude)
        self._capture.per_layer = {}
        outputs = self.handle.model(input_ids=input_ids, attention_mask=mask, labels=labels)
        if self.task_loss is not None:
            task = self.task_loss(outputs, labels)
        elif outputs.loss is not None:
            task = outputs.loss
        else:
            raise InputError("pass labels (or a task_loss) to train with a task loss.")
        regulariser = manifold_regulariser(self._capture.vector(), neighbours_BJF.to(task.device), weights_BJ.to(task.device))
        self.steps_done += 1
        lam = self.lam_at(self.steps_done)
        loss = task + lam * regulariser
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "task": float(task.detach()), "regulariser": float(regulariser.detach()), "lam": lam}

    def close(self) -> None:
        """Restore ``requires_grad`` of every parameter and stop capturing routing."""
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags = []
        self.handle.remove_observer(self._capture)

    def __enter__(self) -> RomaTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
