"""Dr.LLM (``parameterlab/dr-llm``, "Dr.LLM: Dynamic Layer Routing in LLMs"): per layer, a
router decides for the whole sequence to skip the layer, execute it once, or repeat it once.

Router (per layer, as in the code): ``Linear(d, 128) -> GELU(tanh) -> Linear(128, 3)``
over classes {0 skip, 1 execute, 2 repeat}. Input by windowed pooling: the prompt's
hidden states are split into ``min(8, len)`` equal windows (the remainder dropped), each
is mean-pooled, the router is applied to every window mean and the logits are averaged.
One decision per sequence and layer, taken at prefill and reused while decoding; the
layer is applied ``decision`` times. In the lab the "prompt" is the evaluated sequence
itself (``prompt_tokens`` limits it to a prefix), so the decision sees the sequence it is
scored on, as one choice of 3 per layer.

Decision mixing (``continuous_router_decision``, penalty ``p`` in [-1, 1]): interpolate
skip -> router probabilities on [-1, -0.5], router -> execute on (-0.5, 0.5], execute ->
repeat on (0.5, 1], then take the argmax. ``p = -0.5`` is the neutral value (the router's
own argmax); the code's default 0.5 always executes.

Supervision: ``mcts_paths`` searches layer paths per sequence by Monte-Carlo tree search
(actions: skip one or two consecutive layers, repeat one layer once; UCB = mean reward +
1.8 sqrt(ln N / n) - 3.0 len / L; 10 % random child choice; early stop when a path beats
the original or ties it within ``tolerance`` while being >= 2 layers shorter). The reward
is the LM likelihood ratio exp(loss(default) - loss(path)) of the sequence (the paper
scores exact-match of a short generation). Targets: ``decision[l]`` = how often layer
``l`` occurs in the best path. Only the routers are then trained (``fit_drllm_routers``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError
from routelab.depth.blocks import run_recorded_block
from routelab.depth.result import DepthResult, LayerDecision
from routelab.depth.stack import DepthStack

DRLLM_OPTIONS = ("skip", "execute", "repeat")
NEUTRAL_PENALTY = -0.5


def continuous_router_decision(probs_N3: torch.Tensor, penalty: float) -> torch.Tensor:
    """Decision (0 skip, 1 execute, 2 repeat) after mixing the router with the penalty."""
    p = float(penalty)
    if not -1.0 <= p <= 1.0:
        raise ConfigError(f"penalty must be in [-1, 1] (-0.5 = the router's own decision), got {penalty}.")
    skip, execute, repeat = (torch.zeros_like(probs_N3) for _ in range(3))
    skip[..., 0], execute[..., 1], repeat[..., 2] = 1.0, 1.0, 1.0
    if p <= -0.5:
        t = (p + 1.0) / 0.5
        mixed = (1 - t) * skip + t * probs_N3
    elif p <= 0.5:
        t = (p + 0.5) / 1.0
        mixed = (1 - t) * probs_N3 + t * execute
    else:
        t = (p - 0.5) / 0.5
        mixed = (1 - t) * execute + t * repeat
    return mixed.argmax(dim=-1)


def window_means(h_BSD: torch.Tensor, lengths_B: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means ``[B, W, D]`` and their validity ``[B, W]`` (``min(W, len)`` equal windows
    over each prompt, the remainder dropped)."""
    batch, _, d_model = h_BSD.shape
    means = h_BSD.new_zeros(batch, num_windows, d_model)
    valid = torch.zeros(batch, num_windows, dtype=torch.bool, device=h_BSD.device)
    for b in range(batch):
        length = int(lengths_B[b])
        windows = min(num_windows, length)
        if windows == 0:
            continue
        size = length // windows
        means[b, :windows] = h_BSD[b, : windows * size].reshape(windows, size, d_model).mean(dim=1)
        valid[b, :windows] = True
    return means, valid


class DrLLMRouter(nn.Module):
    """``Linear(d, hidden) -> GELU(tanh) -> Linear(hidden, 3)`` averaged over window means."""

    def __init__(self, d_model: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, 3))

    def forward(self, means_BWD: torch.Tensor, valid_BW: torch.Tensor) -> torch.Tensor:
        logits_BW3 = self.net(means_BWD.float())
        weights = valid_BW.float().unsqueeze(-1)
        return (logits_BW3 * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class DrLLMStack(DepthStack):
    """Skip / execute / repeat per sequence and layer (see the module docstring).

    Args:
        num_windows: windows of the pooled router input (8 in the code).
        hidden: router hidden width (128 in the code).
        penalty: decision-mixing penalty in [-1, 1]; -0.5 (default) is neutral.
        prompt_tokens: leading tokens the routers read (None = the whole sequence).
        eval_mode: ``router`` (default), ``execute`` (the unrouted model) or ``given``
            (decisions ``[batch, layers]`` set with ``set_decisions``, e.g. MCTS targets).
    """

    name = "drllm"
    modes = ("router", "execute", "given")
    causal_modes = ("execute",)

    def __init__(self, d_model: int, n_layers: int, *, num_windows: int = 8, hidden: int = 128,
                 penalty: float = NEUTRAL_PENALTY, prompt_tokens: int | None = None, train_mode: str = "execute",
                 eval_mode: str = "router", activation: str = "swiglu") -> None:
        super().__init__(train_mode=train_mode, eval_mode=eval_mode, activation=activation)
        continuous_router_decision(torch.zeros(1, 3), penalty)  # validates the penalty
        if num_windows < 1:
            raise ConfigError(f"num_windows must be >= 1, got {num_windows}.")
        self.d_model, self.n_layers, self.num_windows, self.hidden = d_model, n_layers, num_windows, hidden
        self.penalty, self.prompt_tokens = float(penalty), prompt_tokens
        self.routers = nn.ModuleList(DrLLMRouter(d_model, hidden) for _ in range(n_layers))
        self._given: torch.Tensor | None = None
        self.record_inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "penalty": self.penalty, "num_windows": self.num_windows}

    def set_decisions(self, decisions_BL: torch.Tensor | None) -> None:
        self._given = decisions_BL

    def router_inputs(self, x_BSD: torch.Tensor, padding_mask_BS: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, _ = x_BSD.shape
        lengths = padding_mask_BS.sum(dim=1) if padding_mask_BS is not None else torch.full((batch,), seq)
        if self.prompt_tokens is not None:
            lengths = lengths.clamp_max(self.prompt_tokens)
        return window_means(x_BSD.detach(), lengths, self.num_windows)

    def decide(self, layer: int, x_BSD: torch.Tensor, padding_mask_BS, result: DepthResult) -> torch.Tensor:
        batch = x_BSD.shape[0]
        means, valid = self.router_inputs(x_BSD, padding_mask_BS)
        if self.record_inputs is not None:
            self.record_inputs.append((means, valid))
        mode = self.mode
        if mode == "execute":
            return torch.ones(batch, dtype=torch.long, device=x_BSD.device)
        if mode == "given":
            if self._given is None or tuple(self._given.shape) != (batch, self.n_layers):
                raise ConfigError(f"drllm mode 'given' needs set_decisions() with shape [{batch}, {self.n_layers}].")
            return self._given[:, layer].long().to(x_BSD.device)
        logits_B3 = self.routers[layer](means, valid)
        result.flops.linear(self.d_model, self.hidden, int(valid.sum()), part="depth_router")
        result.flops.linear(self.hidden, 3, int(valid.sum()), part="depth_router")
        return continuous_router_decision(torch.softmax(logits_B3, dim=-1), self.penalty)

    def forward(self, blocks, x_BSD, cos_Sd, sin_Sd, attn_mask_BSS, padding_mask_BS, context):
        result = DepthResult()
        batch, seq, _ = x_BSD.shape
        for index, block in enumerate(blocks):
            decision_B = self.decide(index, x_BSD, padding_mask_BS, result)
            for repeat in (1, 2):
                rows = (decision_B >= repeat).nonzero(as_tuple=True)[0]
                if rows.numel() == 0:
                    continue
                sub_mask = attn_mask_BSS.index_select(0, rows) if attn_mask_BSS is not None else None
                sub_pad = padding_mask_BS.index_select(0, rows) if padding_mask_BS is not None else None
                sub_context = type(context)(
                    token_ids=context.token_ids.index_select(0, rows) if context.token_ids is not None else None,
                    padding_mask=sub_pad, timestep=None, carry=context.carry,
                )
                y = run_recorded_block(block, x_BSD.index_select(0, rows), cos_Sd, sin_Sd, sub_pad, sub_context,
                                       result, self.activation, sub_mask)
                x_BSD = x_BSD.index_copy(0, rows, y)
            real = padding_mask_BS if padding_mask_BS is not None else torch.ones(batch, seq, dtype=torch.bool,
                                                                                   device=x_BSD.device)
            choice_BS = torch.where(real, decision_B.unsqueeze(1).expand(batch, seq), -1)
            result.decisions.append(LayerDecision(index, DRLLM_OPTIONS, choice_BS))
        return x_BSD, result


@dataclass
class _Node:
    counts: tuple[int, ...]
    visits: int = 0
    value: float = 0.0
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    expanded: bool = False


def path_actions(counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Children of a layer path (as per-layer counts): skip one or two consecutive executed
    layers, or repeat one executed layer once (path length <= 2L)."""
    children = []
    n = len(counts)
    for i in range(n):
        if counts[i] == 1:
            children.append(counts[:i] + (0,) + counts[i + 1:])
            children.append(counts[:i] + (2,) + counts[i + 1:])
            if i + 1 < n and counts[i + 1] == 1:
                children.append(counts[:i] + (0, 0) + counts[i + 2:])
    return children


def mcts_paths(loss_fn: Callable[[tuple[int, ...]], float], num_layers: int, *, simulations: int = 200,
               exploration: float = 1.8, length_penalty: float = 3.0, random_choice: float = 0.1,
               tolerance: float = 0.0, seed: int = 0) -> tuple[tuple[int, ...], float, int]:
    """MCTS over layer paths of one sequence; returns (best counts, its loss, evaluations).

    ``loss_fn(counts)`` is the sequence's LM loss when layer ``l`` runs ``counts[l]`` times.
    """
    rng = random.Random(seed)
    root_counts = (1,) * num_layers
    cache: dict[tuple[int, ...], float] = {}

    def loss_of(counts: tuple[int, ...]) -> float:
        if counts not in cache:
            cache[counts] = float(loss_fn(counts))
        return cache[counts]

    base = loss_of(root_counts)
    best, best_loss = root_counts, base
    root = _Node(root_counts)
    for _ in range(simulations):
        node, trail = root, [root]
        while node.expanded and node.children:
            kids = list(node.children.values())
            if rng.random() < random_choice:
                node = rng.choice(kids)
            else:
                total = math.log(max(node.visits, 1))

                def ucb(child: _Node) -> float:
                    if child.visits == 0:
                        return float("inf")
                    mean = child.value / child.visits
                    return mean + exploration * math.sqrt(total / child.visits) - length_penalty * sum(child.counts) / num_layers
                node = max(kids, key=ucb)
            trail.append(node)
        if not node.expanded:
            node.children = {c: _Node(c) for c in path_actions(node.counts)}
            node.expanded = True
        loss = loss_of(node.counts)
        reward = math.exp(base - loss)
        for visited in trail:
            visited.visits += 1
            visited.value += reward
        shorter = num_layers - sum(node.counts)
        if loss < best_loss or (loss == best_loss and sum(node.counts) < sum(best)):
            best, best_loss = node.counts, loss
        if loss < base - 1e-12 or (loss <= base + tolerance and shorter >= 2):
            best, best_loss = node.counts, loss
            break
    return best, best_loss, len(cache)


def focal_loss(logits_N3: torch.Tensor, target_N: torch.Tensor, gamma: float = 0.0,
               class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (``gamma = 0``) or focal loss with optional class weights."""
    log_p = F.log_softmax(logits_N3.float(), dim=-1).gather(1, target_N.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if class_weights is not None:
        loss = loss * class_weights.to(loss.device)[target_N]
    return loss.mean()
