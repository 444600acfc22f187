"""``RoutedLoRALinear``: a frozen ``nn.Linear`` plus a routed bank of LoRA experts.

``y = base(x) + delta(x)``, where the adapter router of the layer decides the combination
(``routelab.adapters.routing``) and ``routelab.adapters.dispatch`` computes ``delta`` in one
batched pass. The layer reads the per-call task ids and padding mask from the shared
``AdapterState`` of its ``AdapterSet`` and, while recording, appends its ``Routing`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from routelab.adapters.bank import LoRABank
from routelab.adapters.dispatch import mixed_delta, routed_delta
from routelab.adapters.routing import AdapterRouter, AdapterRouting
from routelab.core import InputError, TokenBatch


@dataclass
class AdapterState:
    """Per-call side information shared by all routed layers of one model.

    Attributes:
        task_ids: ``[batch]`` int64 task id of each sequence (``-1`` = unknown), or None.
        padding_mask: ``[batch, seq]`` bool, True = real token (padding is not routed).
        records: when a list, each layer appends ``(layer_name, routing, batch)`` to it.
        dispatch: ``auto``, ``grouped_mm`` or ``dense`` (see ``routed_delta``).
    """

    task_ids: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    records: list[tuple[str, AdapterRouting, TokenBatch]] | None = None
    dispatch: str = "auto"


def token_batch(leading_shape: tuple[int, ...], padding_mask: torch.Tensor | None, device: torch.device) -> TokenBatch:
    """The ``TokenBatch`` of an input with leading dims ``[B, S, ...]`` (``[N]`` is one sequence of N tokens)."""
    if len(leading_shape) == 1:
        batch, seq = 1, leading_shape[0]
    else:
        batch, seq = leading_shape[0], int(torch.tensor(leading_shape[1:]).prod())
    if padding_mask is not None:
        if tuple(padding_mask.shape) != (batch, seq):
            raise InputError(f"padding_mask has shape {tuple(padding_mask.shape)} but the routed input is [{batch}, {seq}, ...].")
        mask_BS = padding_mask.to(device=device, dtype=torch.bool)
    else:
        mask_BS = torch.ones(batch, seq, dtype=torch.bool, device=device)
    flat_index_T = torch.nonzero(mask_BS.reshape(-1)).squeeze(1)
    seq_id_T = torch.div(flat_index_T, seq, rounding_mode="floor")
    return TokenBatch(
        batch_size=batch, seq_len=seq, flat_index_T=flat_index_T, seq_id_T=seq_id_T,
        position_T=flat_index_T - seq_id_T * seq, seq_lengths_B=mask_BS.sum(dim=1),
    )


class RoutedLoRALinear(nn.Module):
    """A frozen linear layer with ``E`` routed LoRA experts (see the module docstring).

    Args:
        base: the linear layer to adapt (its parameters are frozen here).
        bank: the experts.
        router: the adapter router.
        state: the ``AdapterState`` shared by the layers of one model.
        name: the module name of ``base`` in the model (records and peft files use it).
    """

    def __init__(self, base: nn.Linear, bank: LoRABank, router: AdapterRouter, state: AdapterState, name: str) -> None:
        super().__init__()
        if bank.d_in != base.in_features or bank.d_out != base.out_features:
            raise InputError(f"{name}: bank is {bank.d_in}->{bank.d_out} but the linear is {base.in_features}->{base.out_features}.")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.bank = bank
        self.router = router
        self.state = state
        self.name = name

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if x.shape[-1] != self.bank.d_in:
            raise InputError(f"{self.name}: input width {x.shape[-1]} != in_features {self.bank.d_in}.")
        leading = tuple(x.shape[:-1])
        batch = token_batch(leading, self.state.padding_mask, x.device)
        x_TD = x.reshape(-1, self.bank.d_in).index_select(0, batch.flat_index_T)
        task_ids_T = None
        if self.state.task_ids is not None:
            task_ids_B = self.state.task_ids.to(x.device)
            if task_ids_B.shape != (batch.batch_size,):
                raise InputError(f"task_ids has shape {tuple(task_ids_B.shape)}; expected one id per sequence, [{batch.batch_size}].")
            task_ids_T = task_ids_B[batch.seq_id_T]
        routing = self.router(x_TD, batch, task_ids_T)
        if routing.mixture_BGE is not None:
            x_BSD = x.reshape(batch.batch_size, batch.seq_len, self.bank.d_in)
            delta = mixed_delta(x_BSD, routing.mixture_BGE, self.bank, self.router.num_heads)
            if self.state.padding_mask is not None:
                delta = delta * self.state.padding_mask.to(delta.device, delta.dtype).unsqueeze(-1)
            delta = delta.reshape(*leading, self.bank.d_out)
        else:
            delta_TO = routed_delta(x_TD, routing.topk_idx, routing.topk_weight, self.bank, self.state.dispatch)
            num_rows = batch.batch_size * batch.seq_len
            if delta_TO.shape[0] != num_rows:  # padding rows get no update
                delta_TO = delta_TO.new_zeros(num_rows, self.bank.d_out).index_copy(0, batch.flat_index_T, delta_TO)
            delta = delta_TO.reshape(*leading, self.bank.d_out)
        if self.state.records is not None:
            self.state.records.append((self.name, routing, batch))
        return y + delta.to(y.dtype)
