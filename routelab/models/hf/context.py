"""Which rows of a transformers MoE forward are real tokens, and where they sit.

A transformers router sees ``[batch*seq, D]`` rows that include padding and knows
nothing of sequences. A forward pre-hook on the base model reads the batch layout
(``input_ids`` / ``inputs_embeds``, the 2-D ``attention_mask`` and the cache length,
read by role whatever the installed transformers calls them: ``ForwardLayout``)
once per model forward and builds a ``ForwardTokens``: the real tokens in (batch,
position) order with their sequence ids, positions and token ids. Routers and
observers of that forward read it from the handle.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError, InputError


@dataclass
class ForwardTokens:
    """The token layout of one model forward (the current chunk only when a cache is used).

    Attributes:
        batch_size, seq_len: the ``[B, S]`` layout of this forward's rows.
        mask_BS: bool, True for real tokens; None when every row is real.
        token_ids_BS: input ids, or None when the model was called with ``inputs_embeds``.
        positions_BS: position of each token among the real tokens of its sequence
            (counting the cached past).
        seq_ids_B: a sequence id per batch row, stable across the forwards of one ``generate``.
    """

    batch_size: int
    seq_len: int
    mask_BS: torch.Tensor | None
    token_ids_BS: torch.Tensor | None
    positions_BS: torch.Tensor
    seq_ids_B: torch.Tensor
    _token_batch: TokenBatch | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return self.batch_size * self.seq_len

    def token_batch(self) -> TokenBatch:
        """The routelab ``TokenBatch`` of the real tokens (cached)."""
        if self._token_batch is None:
            self._token_batch = TokenBatch.from_mask(
                self.batch_size, self.seq_len, self.mask_BS, device=self.positions_BS.device,
                token_ids=self.token_ids_BS,
            )
        return self._token_batch

    def real_rows(self, rows_U: torch.Tensor) -> torch.Tensor:
        """Select the real-token rows of a ``[B*S, ...]`` tensor, in (batch, position) order."""
        batch = self.token_batch()
        return rows_U.index_select(0, batch.flat_index_T) if batch.has_padding else rows_U

    def per_token(self) -> dict[str, torch.Tensor]:
        """``token_ids_T`` (-1 where unknown), ``seq_ids_T`` and ``positions_T`` of the real tokens."""
        batch = self.token_batch()
        flat_T = batch.flat_index_T
        positions_T = self.positions_BS.reshape(-1).index_select(0, flat_T)
        seq_ids_T = self.seq_ids_B.index_select(0, batch.seq_id_T)
        if self.token_ids_BS is None:
            token_ids_T = torch.full_like(positions_T, -1)
        else:
            token_ids_T = self.token_ids_BS.reshape(-1).long().index_select(0, flat_T)
        return {"token_ids_T": token_ids_T, "seq_ids_T": seq_ids_T, "positions_T": positions_T}


def single_sequence_tokens(num_rows: int, device: torch.device) -> ForwardTokens:
    """Layout used when a router is called outside a model forward: one sequence, all rows real."""
    positions = torch.arange(num_rows, device=device).view(1, -1)
    return ForwardTokens(1, num_rows, None, None, positions, torch.zeros(1, dtype=torch.long, device=device))


class SequenceCounter:
    """Gives each new batch of sequences fresh ids; forwards that continue a cache keep them."""

    def __init__(self) -> None:
        self.next_id = 0
        self.current: torch.Tensor | None = None

    def ids_for(self, batch_size: int, past_length: int, device: torch.device) -> torch.Tensor:
        if past_length > 0 and self.current is not None and self.current.numel() == batch_size:
            return self.current.to(device)
        ids = torch.arange(self.next_id, self.next_id + batch_size, device=device)
        self.next_id += batch_size
        self.current = ids
        return ids


# The role of each base-model forward argument routelab reads, and its spellings across
# transformers releases (newest first): 5.24 renamed ``past_key_values`` to ``cache`` and
# still accepts the old names through a deprecation shim.
ARGUMENT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "input_ids": ("input_ids",),
    "inputs_embeds": ("inputs_embeds",),
    "attention_mask": ("attention_mask",),
    "cache": ("cache", "past_key_values", "cache_params"),
}


def _is_cache(value: Any) -> bool:
    return callable(getattr(value, "get_seq_length", None))


@dataclass(frozen=True)
class ForwardLayout:
    """Which parameter of a base model's ``forward`` plays each role routelab reads.

    Built once from the forward's signature (``ForwardLayout.of``); ``read`` then picks the
    arguments of one call by role, whichever of the known spellings the caller used.

    Attributes:
        owner: the forward's qualified name, for error messages.
        parameters: the forward's parameter names in order (``*args``/``**kwargs`` excluded).
        accepts_kwargs: whether the forward takes ``**kwargs`` (where old spellings may arrive).
    """

    owner: str
    parameters: tuple[str, ...]
    accepts_kwargs: bool

    @classmethod
    def of(cls, forward: Any) -> ForwardLayout:
        """Read the layout of ``forward``; a ``ConfigError`` when a role has no parameter."""
        owner = getattr(forward, "__qualname__", type(forward).__name__)
        try:
            signature = inspect.signature(forward)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"cannot read the signature of {owner}: {error}; routelab cannot attach to it.") from None
        kinds = inspect.Parameter
        parameters = tuple(
            name for name, p in signature.parameters.items() if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        )
        missing = [
            f"{role} (one of {', '.join(spellings)})"
            for role, spellings in ARGUMENT_SPELLINGS.items()
            if not any(name in parameters for name in spellings)
        ]
        if missing:
            raise ConfigError(
                f"cannot read the token layout of {owner}{signature}: no parameter for {'; '.join(missing)}. "
                "routelab knows the transformers releases allowed by its pyproject.toml; install one of them "
                "(the tested versions are in requirements/lock.txt)."
            )
        accepts_kwargs = any(p.kind is kinds.VAR_KEYWORD for p in signature.parameters.values())
        return cls(owner, parameters, accepts_kwargs)

    def read(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The arguments of one call by role (None where not given).

        Raises ``InputError`` when two spellings of one role are both given, when there are
        more positional arguments than parameters, or when a KV cache arrives under a name
        routelab does not know (it would otherwise take every decoding step for a new batch).
        """
        if len(args) > len(self.parameters):
            raise InputError(
                f"{self.owner} got {len(args)} positional arguments; routelab can read at most "
                f"{len(self.parameters)} ({', '.join(self.parameters)}). Pass the inputs by name."
            )
        call = dict(zip(self.parameters, args))
        for name, value in kwargs.items():
            if name in call:
                raise InputError(f"{self.owner} got {name!r} both by position and by name.")
            call[name] = value
        known = {name for spellings in ARGUMENT_SPELLINGS.values() for name in spellings}
        by_role: dict[str, Any] = {}
        for role, spellings in ARGUMENT_SPELLINGS.items():
            given = [name for name in spellings if call.get(name) is not None]
            if len(given) > 1:
                raise InputError(f"{self.owner} got both {given[0]!r} and {given[1]!r}; pass only {given[0]!r}.")
            by_role[role] = call[given[0]] if given else None
        for name, value in call.items():
            if name not in known and _is_cache(value):
                raise InputError(
                    f"{self.owner} got a KV cache as {name!r}, a name routelab does not know (it reads the cache "
                    f"as one of {', '.join(ARGUMENT_SPELLINGS['cache'])}); install a transformers release allowed "
                    "by routelab's pyproject.toml."
                )
        return by_role


def _past_length(cache: Any) -> int:
    if cache is None:
        return 0
    if not _is_cache(cache):
        raise InputError(
            f"the KV cache is a {type(cache).__name__} without get_seq_length(); routelab needs a transformers "
            "Cache object to tell continued sequences from new ones."
        )
    return int(cache.get_seq_length())


def forward_tokens_from_call(layout: ForwardLayout, args: tuple, kwargs: dict, counter: SequenceCounter) -> ForwardTokens:
    """Build the ``ForwardTokens`` of a base-model call; an ``InputError`` if its layout cannot be read."""
    call = layout.read(args, kwargs)
    input_ids = call["input_ids"]
    inputs_embeds = call["inputs_embeds"]
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        batch_size, seq_len = input_ids.shape
        device = input_ids.device
    elif isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dim() == 3:
        batch_size, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        input_ids = None
    else:
        raise InputError(
            f"{layout.owner} needs input_ids [batch, seq] or inputs_embeds [batch, seq, hidden] while routelab is "
            f"attached; got input_ids={getattr(input_ids, 'shape', input_ids)}, "
            f"inputs_embeds={getattr(inputs_embeds, 'shape', inputs_embeds)}."
        )
    past = _past_length(call["cache"])
    attention_mask = call.get("attention_mask")
    mask_BS = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise InputError(
                "attention_mask must be a 2-D [batch, seq] tensor (1 = real token) while routelab is attached, got "
                f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}. Pass the tokenizer's "
                "attention_mask instead of a prepared 4-D mask."
            )
        full_BP = attention_mask.to(device).bool()
        if full_BP.shape[0] != batch_size or full_BP.shape[1] < seq_len:
            raise InputError(
                f"attention_mask has shape {tuple(full_BP.shape)} but the inputs are [batch={batch_size}, "
                f"seq={seq_len}]; it must cover the cached past and the current tokens."
            )
        positions_BS = (full_BP.long().cumsum(dim=1) - 1).clamp_min(0)[:, -seq_len:]
        current_BS = full_BP[:, -seq_len:]
        mask_BS = None if bool(current_BS.all()) else current_BS
    else:
        positions_BS = (torch.arange(seq_len, device=device) + past).view(1, -1).expand(batch_size, -1)
    seq_ids_B = counter.ids_for(batch_size, past, device)
    return ForwardTokens(batch_size, seq_len, mask_BS, input_ids, positions_BS, seq_ids_B)
