"""What a router may know about the tokens besides their hidden states.

``RoutingContext`` is built once per model forward and threaded through every MoE layer;
it carries per-batch side information (token ids, padding, diffusion timestep, attention)
and a ``carry`` dict in which a router may pass state to the next layer (layerwise
recurrent routers). ``TokenBatch`` is the per-layer, router-facing view: only the real
(non-padding) tokens, flattened, with their sequence ids and positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingContext:
    """Side information for one model forward, shared by all MoE layers of the model.

    Attributes:
        token_ids: ``[batch, seq]`` int64 input vocabulary ids (hash routers need them).
        padding_mask: ``[batch, seq]`` bool, True marks a real token.
        timestep: ``[batch]`` float in [0, 1] (e.g. the mask ratio of a diffusion LM).
        attention: ``[batch, seq, seq]`` attention weights of the preceding attention
            sublayer, averaged over heads (attention-aware routers read it).
        carry: state passed from one MoE layer to the next within this forward; keys are
            owned by the routers that write them.
    """

    token_ids: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    timestep: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    carry: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenBatch:
    """The real tokens of one layer call, flattened to ``T`` rows in (batch, position) order.

    Attributes:
        batch_size, seq_len: the padded ``[B, S]`` layout the tokens came from.
        flat_index_T: row of each real token in the flattened ``B*S`` layout.
        seq_id_T: sequence (batch row) of each real token.
        position_T: position of each token inside its sequence.
        seq_lengths_B: number of real tokens per sequence.
        token_ids_T: vocabulary id of each real token, when known.
        context: the model-level context (timestep, attention, carry).
    """

    batch_size: int
    seq_len: int
    flat_index_T: torch.Tensor
    seq_id_T: torch.Tensor
    position_T: torch.Tensor
    seq_lengths_B: torch.Tensor
    token_ids_T: torch.Tensor | None = None
    context: RoutingContext = field(default_factory=RoutingContext)
    has_padding: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.flat_index_T.numel())

    @classmethod
    def from_mask(
        cls,
        batch_size: int,
        seq_len: int,
        padding_mask: torch.Tensor | None,
        *,
        device: torch.device | str = "cpu",
        token_ids: torch.Tensor | None = None,
        context: RoutingContext | None = None,
    ) -> TokenBatch:
        """Describe a ``[batch_size, seq_len]`` batch whose real tokens are ``padding_mask``."""
        context = context if context is not None else RoutingContext()
        if padding_mask is None:
            n = batch_size * seq_len
            flat = torch.arange(n, device=device)
            lengths = torch.full((batch_size,), seq_len, device=device, dtype=torch.long)
            has_padding = False
        else:
            flat = padding_mask.reshape(-1).nonzero(as_tuple=True)[0]
            lengths = padding_mask.sum(dim=1).long()
            has_padding = bool(flat.numel() != batch_size * seq_len)
        seq_id = torch.div(flat, max(seq_len, 1), rounding_mode="floor")
        position = flat - seq_id * seq_len
        ids = None
        if token_ids is not None:
            ids = token_ids.reshape(-1).long()
            ids = ids.index_select(0, flat) if has_padding else ids
        return cls(batch_size, seq_len, flat, seq_id, position, lengths, ids, context, has_padding)

    @classmethod
    def single_sequence(cls, num_tokens: int, device: torch.device | str = "cpu", **kwargs: Any) -> TokenBatch:
        """Treat ``num_tokens`` flat tokens as one sequence (for calling a router directly)."""
        return cls.from_mask(1, num_tokens, None, device=device, **kwargs)
