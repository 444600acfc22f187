"""TinyLM: a small decoder-only transformer whose FFNs are dense or routelab MoE layers.

Pre-norm blocks (RMSNorm, Zhang & Sennrich 2019), rotary positions (RoFormer, Su et al.
2021), causal ``F.scaled_dot_product_attention`` and tied input/output embeddings (Press &
Wolf 2017), as in GPT-2/LLaMA-style small models. The FFN of every layer, or of every
``moe_every``-th layer, is a routelab MoE layer with any router preset (``routelab.moe_layer``:
``routelab.MoE``, or ``routelab.SoftMoE`` for a soft router).

What routers get: one ``RoutingContext`` per forward (token ids for hash routers, the
padding mask, an optional timestep, and the ``carry`` dict that layerwise-recurrent
routers use to pass state from one MoE layer to the next). A router whose module has the
attribute ``needs_attention = True``, or whose preset is registered with
``needs_attention=True``, also receives the head-averaged attention probabilities
``[batch, seq, seq]`` of its block's attention sublayer in ``TokenBatch.context.attention``;
only those layers compute attention explicitly, every other layer uses the fused SDPA
kernel. Token-id hash routers get a different hash per layer (``seed`` = layer index)
unless ``router_options`` sets ``seed``.

Depth routing (``depth_router``, see ``routelab.depth``): a ``DepthStack`` runs the blocks
instead of the plain loop, deciding per token (or sequence) to execute, skip, approximate
or repeat them. Every forward reports the analytic FLOPs per token it executed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.context import RoutingContext
from routelab.core.errors import ConfigError, InputError
from routelab.core.routing import Routing
from routelab.core.validation import check_choice, check_positive_int, check_token_tensor
from routelab.depth import DepthResult, DepthStack, build_depth_stack
from routelab.depth.blocks import count_standard_forward
from routelab.moe.experts import ACTIVATIONS, DenseFFN
from routelab.moe.soft import moe_layer
from routelab.routers.registry import preset_info

FFN_KINDS = ("dense", "moe")
OBJECTIVES = ("causal", "masked-diffusion")


def shape_field(default: Any, *, flag: str, help: str, minimum: int | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A ``TinyLMConfig`` field that experiments set: the lab's pydantic ``ModelSettings`` and the
    ``--flag`` of ``routelab train`` / ``routelab compare`` are derived from it (default, help,
    bounds), so the three cannot drift apart."""
    return field(default=default, metadata={"flag": flag, "help": help, "minimum": minimum, "choices": choices})


@dataclass
class TinyLMConfig:
    """Shape and routing of a TinyLM.

    Attributes:
        vocab_size: tokenizer vocabulary size.
        d_model, n_layers, n_heads: transformer shape (``d_model % n_heads == 0``, even head dim).
        max_seq_len: longest sequence (rotary tables are built for it).
        ffn: ``dense`` (every FFN dense) or ``moe``.
        d_ff: hidden width of the dense FFNs (default ``4 * d_model``).
        router: router preset of the MoE layers (``routelab list``).
        router_options: options of that preset (e.g. ``{"aux_loss_coef": 0.01}``).
        num_experts: routed experts per MoE layer.
        top_k: experts per token: one int, a list with one entry per MoE layer, or None
            for the preset's default. The default 2 gives every router the same number of
            active experts, which a comparison of routers needs.
        expert_d_hidden: hidden width of each routed expert (default ``d_ff``).
        moe_every: 1 = every FFN is MoE; n = layers ``n-1, 2n-1, ...`` are MoE.
        num_shared_experts, shared_d_hidden: always-on experts (DeepSeekMoE).
        activation: ``swiglu``, ``gelu`` or ``relu``.
        rope_base: rotary base frequency.
        init_std: std of the embedding and projection initialisation.
        depth_router: a depth method of ``routelab.depth`` (None = every block runs).
        depth_options: options of that method (e.g. ``{"capacity": 0.125}``).
        objective: ``causal`` (next-token prediction, causal attention) or
            ``masked-diffusion`` (bidirectional attention and one extra embedding row, the
            mask token ``vocab_size``; trained by ``routelab.models.masked_diffusion``).

    The fields made with ``shape_field`` are the ones an experiment sets (``shape_fields()``).
    """

    vocab_size: int
    d_model: int = shape_field(128, flag="--d-model", help="Model width.", minimum=2)
    n_layers: int = shape_field(4, flag="--n-layers", help="Transformer layers.", minimum=1)
    n_heads: int = shape_field(4, flag="--n-heads", help="Attention heads.", minimum=1)
    max_seq_len: int = 256
    ffn: str = "moe"
    d_ff: int | None = shape_field(None, flag="--d-ff", help="Width of the dense FFNs (default: 4*d_model).", minimum=1)
    router: str = "mixtral"
    router_options: dict[str, Any] = field(default_factory=dict)
    num_experts: int = shape_field(8, flag="--num-experts", help="Routed experts per MoE layer.", minimum=1)
    top_k: int | list[int] | None = shape_field(
        2, flag="--top-k", help="Experts per token, or one value per MoE layer (comma-separated)."
    )
    expert_d_hidden: int | None = shape_field(
        None, flag="--expert-d-hidden", help="Hidden width of each expert (default: 4*d_model).", minimum=1
    )
    moe_every: int = shape_field(1, flag="--moe-every", help="Every n-th layer is MoE (1 = all).", minimum=1)
    num_shared_experts: int = shape_field(
        0, flag="--shared-experts", help="Always-on shared experts per MoE layer.", minimum=0
    )
    shared_d_hidden: int | None = shape_field(
        None, flag="--shared-d-hidden", help="Hidden width of each shared expert (default: the expert width).",
        minimum=1,
    )
    activation: str = shape_field("swiglu", flag="--activation", help=f"FFN activation: {', '.join(ACTIVATIONS)}.",
                                  choices=ACTIVATIONS)
    rope_base: float = 10000.0
    init_std: float = 0.02
    objective: str = shape_field("causal", flag="--objective", help=f"Training objective: {', '.join(OBJECTIVES)}.",
                                 choices=OBJECTIVES)
    depth_router: str | None = None
    depth_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "num_experts", "moe_every"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("num_shared_experts", self.num_shared_experts, minimum=0)
        check_choice("ffn", self.ffn, FFN_KINDS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("objective", self.objective, OBJECTIVES)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads} with an even head "
                "dimension (rotary positions rotate pairs of channels)."
            )
        for name in ("d_ff", "expert_d_hidden", "shared_d_hidden"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if not isinstance(self.router_options, dict):
            raise ConfigError(f"router_options must be a dict of preset options, got {type(self.router_options).__name__}.")
        if self.ffn == "moe":
            preset_info(self.router)  # unknown names fail here, with suggestions
            if self.moe_every > self.n_layers:
                raise ConfigError(
                    f"moe_every={self.moe_every} > n_layers={self.n_layers} leaves no MoE layer; "
                    f"use moe_every <= {self.n_layers} or ffn='dense'."
                )
            if isinstance(self.top_k, (list, tuple)):
                self.top_k = [int(k) for k in self.top_k]
                if len(self.top_k) != len(self.moe_layer_indices):
                    raise ConfigError(
                        f"top_k has {len(self.top_k)} entries but the model has {len(self.moe_layer_indices)} MoE "
                        f"layers (layers {self.moe_layer_indices}); give one top_k per MoE layer or a single int."
                    )
        if self.depth_router is not None:
            if self.objective != "causal":
                raise ConfigError(f"depth routers run causal language models; objective={self.objective!r} is not "
                                  "supported with depth_router (use objective='causal').")
            self.build_depth()  # unknown methods and options fail here

    def build_depth(self) -> DepthStack | None:
        """The depth stack of this config (None without ``depth_router``)."""
        if self.depth_router is None:
            return None
        return build_depth_stack(self.depth_router, d_model=self.d_model, n_layers=self.n_layers, d_ff=self.ffn_width,
                                 ffn=self.ffn, activation=self.activation, options=self.depth_options)

    @property
    def causal(self) -> bool:
        return self.objective == "causal"

    @property
    def mask_token_id(self) -> int | None:
        """Id of the mask token of a masked-diffusion model (``vocab_size``), None for a causal one."""
        return None if self.causal else self.vocab_size

    @property
    def ffn_width(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the layers whose FFN is an MoE layer."""
        if self.ffn == "dense":
            return []
        return [i for i in range(self.n_layers) if i % self.moe_every == self.moe_every - 1]

    def top_k_of(self, moe_position: int) -> int | None:
        """``top_k`` of the ``moe_position``-th MoE layer (None: the preset's default)."""
        if isinstance(self.top_k, list):
            return self.top_k[moe_position]
        return self.top_k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TinyLM config keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**data)

    def dense_equivalent(self) -> TinyLMConfig:
        """The dense TinyLM with the same active FFN parameters per token.

        Its FFN width is ``top_k * expert_d_hidden + num_shared_experts * shared_d_hidden``.
        Needs ``moe_every == 1`` and a single ``top_k``.
        """
        if self.ffn == "dense":
            return dataclasses.replace(self)
        if self.moe_every != 1 or isinstance(self.top_k, list):
            raise ConfigError("dense_equivalent() needs moe_every=1 and a single top_k (every layer the same width).")
        expert_width = self.expert_d_hidden or self.ffn_width
        top_k = self.top_k if self.top_k is not None else min(preset_info(self.router).default_top_k, self.num_experts)
        width = top_k * expert_width + self.num_shared_experts * (self.shared_d_hidden or expert_width)
        return dataclasses.replace(self, ffn="dense", d_ff=width, router_options={}, top_k=None,
                                   depth_router=None, depth_options={})


def shape_fields() -> list[dataclasses.Field]:
    """The ``TinyLMConfig`` fields that experiments set, in declaration order (see ``shape_field``)."""
    return [f for f in dataclasses.fields(TinyLMConfig) if "flag" in f.metadata]


@dataclass
class TinyLMOutput:
    """What ``TinyLM.forward`` returns.

    Attributes:
        logits: ``[batch, seq, vocab]``.
        loss: ``lm_loss + aux_loss`` (None without targets).
        lm_loss: mean next-token cross-entropy over the counted targets (None without targets).
        aux_loss: sum over MoE layers of each router's coefficient-weighted losses.
        routings: one ``Routing`` per MoE layer, in layer order.
        moe_layers: the layer index of each entry of ``routings``.
        depth: what the depth router decided and executed (None without one).
        flops_per_token: analytic forward FLOPs per real token actually executed.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routings: list[Routing]
    moe_layers: list[int]
    depth: DepthResult | None = None
    flops_per_token: float | None = None


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables ``[seq_len, head_dim]`` of rotary position embeddings (RoFormer)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BASd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + d/2)`` by the position angle (the "rotate half" layout)."""
    half = x_BASd.shape[-1] // 2
    rotated = torch.cat([-x_BASd[..., half:], x_BASd[..., :half]], dim=-1)
    return x_BASd * cos_Sd.to(x_BASd.dtype) + rotated * sin_Sd.to(x_BASd.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions: causal, or bidirectional with ``causal=False``.

    ``forward(..., need_weights=True)`` computes the attention explicitly and also returns
    the head-averaged probabilities ``[batch, seq, seq]`` (fp32); otherwise it uses the
    fused ``scaled_dot_product_attention`` and returns None for them.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_Sd: torch.Tensor,
        sin_Sd: torch.Tensor,
        attn_mask_BSS: torch.Tensor | None,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, d_model = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos_Sd, sin_Sd), apply_rotary(k, cos_Sd, sin_Sd)
        mask = attn_mask_BSS.unsqueeze(1) if attn_mask_BSS is not None else None
        probs_BSS = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
            if mask is None and self.causal:
                mask = torch.ones(seq, seq, dtype=torch.bool, device=x_BSD.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs_BASS = torch.softmax(scores, dim=-1)
            probs_BSS = probs_BASS.mean(dim=1)
            y = probs_BASS.to(v.dtype) @ v
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, seq, d_model)), probs_BSS


def router_needs_attention(router: nn.Module) -> bool:
    """True when a router reads the attention matrix: its ``needs_attention`` attribute, or
    the ``needs_attention`` flag of its preset when the registry has one."""
    if getattr(router, "needs_attention", False):
        return True
    name = getattr(router, "name", None)
    try:
        info = preset_info(name) if isinstance(name, str) else None
    except ConfigError:
        return False
    return bool(getattr(info, "needs_attention", False))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: TinyLMConfig, layer_index: int, moe_position: int | None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, causal=config.causal)
        self.ffn_norm = nn.RMSNorm(config.d_model)
        self.is_moe = moe_position is not None
        if moe_position is None:
            self.ffn: nn.Module = DenseFFN(config.d_model, config.ffn_width, config.activation)
            self.needs_attention = False
        else:
            options = dict(config.router_options)
            info = preset_info(config.router)
            if info.needs_token_ids and "seed" in info.specific_options() and "seed" not in options:
                options["seed"] = layer_index  # token-id hashing: a different hash function per layer
            self.ffn = moe_layer(
                d_model=config.d_model,
                d_hidden=config.expert_d_hidden or config.ffn_width,
                num_experts=config.num_experts,
                top_k=config.top_k_of(moe_position),
                router=config.router,
                activation=config.activation,
                num_shared_experts=config.num_shared_experts,
                shared_d_hidden=config.shared_d_hidden,
                **options,
            )
            self.needs_attention = router_needs_attention(self.ffn.router)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_Sd: torch.Tensor,
        sin_Sd: torch.Tensor,
        attn_mask_BSS: torch.Tensor | None,
        context: RoutingContext,
    ) -> tuple[torch.Tensor, Routing | None]:
        attn_out, attention_BSS = self.attn(self.attn_norm(x_BSD), cos_Sd, sin_Sd, attn_mask_BSS, self.needs_attention)
        x_BSD = x_BSD + attn_out
        h_BSD = self.ffn_norm(x_BSD)
        if not self.is_moe:
            return x_BSD + self.ffn(h_BSD), None
        out = self.ffn(h_BSD, context=context, attention=attention_BSS)
        return x_BSD + out.y, out.routing


class TinyLM(nn.Module):
    """A decoder-only language model with dense or MoE FFNs (see the module docstring)."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size + (0 if config.causal else 1), config.d_model)
        moe_layers = config.moe_layer_indices
        self.blocks = nn.ModuleList(
            Block(config, i, moe_layers.index(i) if i in moe_layers else None) for i in range(config.n_layers)
        )
        self.final_norm = nn.RMSNorm(config.d_model)
        self.depth = config.build_depth()
        cos, sin = rotary_tables(config.max_seq_len, config.d_model // config.n_heads, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def moe_layers(self) -> list[int]:
        return self.config.moe_layer_indices

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std) everywhere, output projections scaled by ``1/sqrt(2 L)``.

        Expert weights and routers keep the initialisation of their own modules.
        """
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and parameters active per token (routed experts count ``k/E``)."""
        total = sum(p.numel() for p in self.parameters())
        active = float(total)
        for block in self.blocks:
            if block.is_moe:
                experts = block.ffn.experts
                expert_params = sum(p.numel() for p in experts.parameters())
                active -= expert_params * (1 - block.ffn.top_k / experts.num_experts)
        return {"total": total, "active": int(round(active))}

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        timestep: torch.Tensor | None = None,
    ) -> TinyLMOutput:
        """Run ``input_ids`` (``[batch, seq]`` int64).

        Args:
            targets: ``[batch, seq]`` next-token ids; ``-100`` (and padding) is not counted.
            padding_mask: ``[batch, seq]`` bool, True = real token. Padding is never routed;
                a padded position attends only to itself and to real tokens before it.
            timestep: ``[batch]`` passed to routers in the routing context.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError(f"input_ids must be a [batch, seq] integer tensor, got {getattr(input_ids, 'shape', input_ids)!r}.")
        batch, seq = input_ids.shape
        check_token_tensor("input_ids", input_ids, batch, seq, dtype_kind="int")
        if seq > self.config.max_seq_len:
            raise InputError(f"input_ids has {seq} positions but max_seq_len={self.config.max_seq_len}.")
        if input_ids.numel() and int(input_ids.max()) >= self.embed.num_embeddings:
            raise InputError(f"input_ids holds id {int(input_ids.max())} >= vocab_size={self.config.vocab_size}"
                             + ("" if self.config.causal else " (+1 for the mask token)") + ".")
        check_token_tensor("padding_mask", padding_mask, batch, seq, dtype_kind="bool")
        if targets is not None and (tuple(targets.shape) != (batch, seq) or targets.is_floating_point()):
            raise InputError(f"targets must be a [batch, seq] = [{batch}, {seq}] integer tensor, got "
                             f"{tuple(targets.shape)} {targets.dtype}.")
        attn_mask_BSS = None
        if padding_mask is not None and not bool(padding_mask.all()):
            causal_SS = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device)
            causal_SS = causal_SS.tril() if self.config.causal else causal_SS
            eye_SS = torch.eye(seq, dtype=torch.bool, device=input_ids.device)
            attn_mask_BSS = (causal_SS & padding_mask.unsqueeze(1)) | eye_SS
        else:
            padding_mask = None
        context = RoutingContext(token_ids=input_ids, padding_mask=padding_mask, timestep=timestep)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x_BSD = self.embed(input_ids)
        routings: list[Routing] = []
        depth = None
        if self.depth is not None:
            x_BSD, depth = self.depth(self.blocks, x_BSD, cos, sin, attn_mask_BSS, padding_mask, context)
            routings = depth.moe_routings
            flops = depth.flops
        else:
            for block in self.blocks:
                x_BSD, routing = block(x_BSD, cos, sin, attn_mask_BSS, context)
                if routing is not None:
                    routings.append(routing)
            flops = count_standard_forward(self.blocks, routings, padding_mask, batch, seq, self.config.activation)
        logits = F.linear(self.final_norm(x_BSD), self.embed.weight[: self.config.vocab_size])
        real_tokens = batch * seq if padding_mask is None else int(padding_mask.sum())
        flops.linear(self.config.d_model, self.config.vocab_size, real_tokens, part="output")
        flops.tokens = real_tokens
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        if depth is not None and depth.aux_loss is not None:
            aux_loss = aux_loss + depth.aux_loss
        for routing in routings:
            if routing.aux_loss is not None:
                aux_loss = aux_loss + routing.aux_loss
        lm_loss = loss = None
        if targets is not None:
            if padding_mask is not None:
                targets = targets.masked_fill(~padding_mask, -100)
            lm_loss = F.cross_entropy(logits.float().view(batch * seq, -1), targets.reshape(-1), ignore_index=-100)
            loss = lm_loss + aux_loss
        return TinyLMOutput(logits, loss, lm_loss, aux_loss, routings, self.moe_layers, depth, flops.per_token())
