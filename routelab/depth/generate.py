"""Left-to-right decoding with a KV cache through a depth-routed TinyLM.

Each block keeps the keys and values of exactly the tokens that executed it (a token that
Mixture-of-Depths or gamma-MoD routes around a block writes nothing there, as in the
paper's decoding), and a block that Dr.LLM repeats keeps a second cache for its second
application. Tokens are processed one at a time - the prompt too - so every decision is
the causal one the model makes in evaluation, and the logits of a decoded sequence equal
those of one full forward pass in the same mode (tested).

Which methods decode this way: MoD in ``causal-aux``/``causal-mlp``, gamma-MoD with its
threshold rule (``prefill_threshold`` on the prompt, ``threshold`` on generated tokens),
Duo-LLM in every mode but ``given``, LFF with ``threshold``, halting, and Dr.LLM, whose
per-layer decisions are taken once from the prompt (a full forward at prefill) and reused.
Top-C / top-k selection over a sequence (MoD ``topk``, gamma-MoD ``topk``, LFF ``topk``)
is training-time only: it needs the future of the sequence.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from routelab.core.context import RoutingContext
from routelab.core.errors import ConfigError, InputError
from routelab.depth.blocks import KV_CACHE_KEY, run_block
from routelab.depth.flops import FlopCounter


class KVCache:
    """Keys and values per (block, application), for one sequence."""

    def __init__(self) -> None:
        self.keys: dict[tuple[int, int], torch.Tensor] = {}
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.calls: dict[int, int] = {}

    def new_token(self) -> None:
        self.calls = {}

    def attend(self, block: Any, h_BND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               valid_BN: torch.Tensor | None, counter: FlopCounter) -> torch.Tensor:
        """Attention of the new token(s) ``h_BND`` (normalised) over the cache, then cache them."""
        from routelab.models.tinylm import apply_rotary  # noqa: PLC0415 - the model's rotary layout

        attn = block.attn
        batch, n, d_model = h_BND.shape
        if batch != 1 or n != 1:
            raise InputError(f"KV-cache decoding takes one new token at a time, got [{batch}, {n}].")
        slot = self.calls.get(block.layer_index, 0)
        self.calls[block.layer_index] = slot + 1
        key = (block.layer_index, slot)
        q, k, v = attn.qkv(h_BND).view(1, 1, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if key in self.keys:
            k, v = torch.cat([self.keys[key], k], dim=2), torch.cat([self.values[key], v], dim=2)
        self.keys[key], self.values[key] = k, v
        y = F.scaled_dot_product_attention(q, k, v)
        counter.attention(d_model, 1, int(k.shape[2]))
        return attn.out(y.transpose(1, 2).reshape(1, 1, d_model))

    def cached_tokens(self) -> dict[tuple[int, int], int]:
        """Tokens held per (block, application)."""
        return {key: int(value.shape[2]) for key, value in self.keys.items()}


@dataclass
class Generation:
    """Result of ``generate``: ``ids`` ``[batch, prompt + new]``, the logits of every
    processed position ``[batch, prompt + new - 1, vocab]``, cache sizes and FLOPs per token."""

    ids: torch.Tensor
    logits: torch.Tensor
    cached_tokens: list[dict[tuple[int, int], int]] = field(default_factory=list)
    flops_per_token: float = 0.0


def check_decodable(model: Any) -> None:
    stack = model.depth
    if stack is None:
        return
    mode = stack.mode
    if stack.name == "drllm":
        return
    if mode not in stack.causal_modes or mode == "given":
        raise ConfigError(
            f"{stack.name} mode {mode!r} is training-time only (it selects over the whole sequence); decode with one "
            f"of {[m for m in stack.causal_modes if m != 'given']} (model.depth.use_mode(...) or eval_mode)."
        )


@torch.no_grad()
def step_logits(model: Any, token: torch.Tensor, position: int, cache: KVCache, counter: FlopCounter,
                prompt: bool) -> torch.Tensor:
    """Logits ``[vocab]`` after feeding one token at ``position`` through the cached model."""
    x = model.embed(token.view(1, 1))
    cos, sin = model.rope_cos[position:position + 1], model.rope_sin[position:position + 1]
    context = RoutingContext(token_ids=token.view(1, 1), carry={KV_CACHE_KEY: cache})
    cache.new_token()
    stack = model.depth
    if stack is None:
        for block in model.blocks:
            x, _ = run_block(block, x, cos, sin, None, context, counter, model.config.activation)
    else:
        threshold = None
        if stack.name == "gamma-mod" and prompt:
            threshold, stack.threshold = stack.threshold, stack.prefill_threshold
        try:
            x, result = stack(model.blocks, x, cos, sin, None, None, context)
        finally:
            if threshold is not None:
                stack.threshold = threshold
        for part, value in result.flops.by_part.items():
            counter.add(part, value)
    counter.linear(model.config.d_model, model.config.vocab_size, 1, part="output")
    counter.tokens += 1
    return F.linear(model.final_norm(x), model.embed.weight)[0, 0]


@torch.no_grad()
def generate(model: Any, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> Generation:
    """Decode ``max_new_tokens`` after each prompt of ``prompt_ids`` (``[batch, prompt]``)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise InputError(f"prompt_ids must be [batch, prompt >= 1], got {tuple(prompt_ids.shape)}.")
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise InputError(f"prompt + max_new_tokens = {total} > max_seq_len={model.config.max_seq_len}.")
    was_training = model.training
    model.eval()
    stack = model.depth
    check_decodable(model)
    rows, all_logits, caches = [], [], []
    counter = FlopCounter()
    try:
        for prompt in prompt_ids:
            prompt = prompt.unsqueeze(0)
            cache = KVCache()
            if stack is not None and stack.name == "drllm":
                out = model(prompt)  # prefill: one decision per layer from the prompt, reused while decoding
                stack.set_decisions(torch.stack([d.choice_BS[:, 0] for d in out.depth.decisions], dim=1))
            ids = prompt[0].tolist()
            logits = []
            mode = stack.use_mode("given") if stack is not None and stack.name == "drllm" else nullcontext()
            with mode:
                for position in range(total - 1):
                    if position >= len(ids):
                        break
                    step = step_logits(model, torch.tensor(ids[position]), position, cache, counter,
                                       prompt=position < prompt.shape[1] - 1)
                    logits.append(step)
                    if position >= prompt.shape[1] - 1 and len(ids) < total:
                        if temperature > 0:
                            probs = torch.softmax(step.float() / temperature, dim=-1)
                            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
                        else:
                            ids.append(int(step.argmax()))
            if stack is not None and stack.name == "drllm":
                stack.set_decisions(None)
            rows.append(torch.tensor(ids))
            all_logits.append(torch.stack(logits))
            caches.append(cache.cached_tokens())
    finally:
        model.train(was_training)
    return Generation(torch.stack(rows), torch.stack(all_logits), caches, counter.per_token())

