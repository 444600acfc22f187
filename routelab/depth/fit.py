"""Second training stages of the depth methods and their evaluation in every mode.

* Duo-LLM: oracle paths on training batches, then the per-layer routers learn the
  oracle's choice (cross-entropy) on the frozen LM, fed the hidden states of the oracle
  path (teacher forcing).
* Dr.LLM: MCTS paths per training sequence, then the routers learn ``decision[l]``
  (cross-entropy, or focal loss with ``focal_gamma > 0``) on the frozen LM.
* LFF: forecasters fit the FFN outputs by MSE, the scorers fit ``log ||f(h) - y_hat||``,
  and the causal thresholds are set to the ``1 - sparsity`` quantile of the scores.
* MoD / gamma-MoD / halting need no second stage (their routers train with the LM).

``mode_report`` evaluates a model under every decision rule of its depth stack (plus
Duo-LLM's oracle and Dr.LLM's MCTS paths), each with its loss and executed FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from routelab.core.errors import ConfigError
from routelab.depth.drllm import focal_loss, mcts_paths
from routelab.depth.oracle import SMALL, oracle_search, token_difficulty

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, S], targets [B, S])
HALTING_SWEEP = (0.3, 0.5, 1.0)


def as_pairs(batches: Iterable[Any]) -> list[Batch]:
    """``(inputs, targets)`` pairs from lab batches or tuples."""
    return [(b.inputs, b.targets) if hasattr(b, "inputs") else (b[0], b[1]) for b in batches]


@torch.no_grad()
def token_losses(model: Any, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-token next-token loss ``[B*S]`` and the forward's FLOPs per token."""
    out = model(inputs)
    losses = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses, float(out.flops_per_token)


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Evaluation mode for the LM while a second stage or a mode report runs (restores the flag)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def evaluate_mode(model: Any, batches: Sequence[Batch], mode: str | None) -> dict[str, Any]:
    """Mean loss, FLOPs per token and per-layer option rates under one decision rule."""
    stack = model.depth
    loss_sum, flops_sum, count = 0.0, 0.0, 0
    rates: dict[int, dict[str, float]] = {}
    mismatch: dict[str, float] = {}
    measure = hasattr(stack, "measure_mismatch")
    if measure:
        stack.measure_mismatch = True
    with frozen(model), (stack.use_mode(mode) if mode is not None else nullcontext()), torch.no_grad():
        for inputs, targets in batches:
            out = model(inputs)
            losses = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            n = losses.numel()
            loss_sum += float(losses.sum())
            flops_sum += float(out.flops_per_token) * n
            count += n
            for key, value in out.depth.extras.items():
                if key.startswith("mismatch"):
                    mismatch[key] = mismatch.get(key, 0.0) + value * n
            for decision in out.depth.decisions:
                layer_rates = rates.setdefault(decision.layer, {})
                for option, rate in decision.rates().items():
                    layer_rates[option] = layer_rates.get(option, 0.0) + rate * n
    if measure:
        stack.measure_mismatch = False
    report = {
        "val_loss": loss_sum / max(count, 1),
        "flops_per_token": flops_sum / max(count, 1),
        "rates": {str(layer): {o: v / max(count, 1) for o, v in r.items()} for layer, r in rates.items()},
    }
    if mismatch:
        report["mismatch"] = {k: v / max(count, 1) for k, v in mismatch.items()}
    return report


# --- Duo-LLM -----------------------------------------------------------------------------

def duo_loss_fn(model: Any, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``paths_PL -> losses_PT``: each path applied to every token of the batch."""
    stack = model.depth
    batch, seq = inputs.shape

    def loss_fn(paths_PL: torch.Tensor) -> torch.Tensor:
        rows = []
        with stack.use_mode("given"):
            for path in paths_PL:
                stack.set_choices(path.view(-1, 1, 1).expand(-1, batch, seq))
                rows.append(token_losses(model, inputs, targets)[0])
        stack.set_choices(None)
        return torch.stack(rows)
    return loss_fn


def duo_oracle(model: Any, inputs: torch.Tensor, targets: torch.Tensor, *, budget: int | None = None,
               allow_skip: bool = True, beam: int = 4, exhaustive_max_layers: int = 6) -> dict[str, torch.Tensor]:
    """Oracle paths ``[T, L]``, their losses, the all-small losses and the token difficulty."""
    stack = model.depth
    with frozen(model):
        loss_fn = duo_loss_fn(model, inputs, targets)
        result = oracle_search(loss_fn, stack.n_layers, budget, allow_skip=allow_skip, beam=beam,
                               exhaustive_max_layers=exhaustive_max_layers)
        small_T = loss_fn(torch.full((1, stack.n_layers), SMALL, dtype=torch.long))[0]
    return {"path_TL": result.path_TL, "loss_T": result.loss_T, "all_small_T": small_T,
            "difficulty_T": token_difficulty(small_T, result.loss_T)}


def path_choices(path_TL: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    return path_TL.t().reshape(-1, batch, seq)


def fit_duo_routers(model: Any, batches: Sequence[Batch], *, epochs: int = 20, lr: float = 1e-3,
                    budget: int | None = None, allow_skip: bool = True) -> dict[str, Any]:
    """Train the Duo-LLM routers to predict the oracle's choice per token and layer."""
    stack = model.depth
    inputs_L: list[list[torch.Tensor]] = [[] for _ in range(stack.n_layers)]
    targets_L: list[list[torch.Tensor]] = [[] for _ in range(stack.n_layers)]
    with frozen(model), torch.no_grad():
        for inputs, targets in batches:
            oracle = duo_oracle(model, inputs, targets, budget=budget, allow_skip=allow_skip)
            choices = path_choices(oracle["path_TL"], *inputs.shape)
            stack.set_choices(choices)
            stack.record_inputs = []
            with stack.use_mode("given"):
                model(inputs)
            for layer, h in enumerate(stack.record_inputs):
                inputs_L[layer].append(h.reshape(-1, h.shape[-1]).float())
                targets_L[layer].append(choices[layer].reshape(-1))
            stack.record_inputs = None
            stack.set_choices(None)
    accuracy = []
    for layer, router in enumerate(stack.routers):
        x = torch.cat(inputs_L[layer])
        y = torch.cat(targets_L[layer])
        optimizer = torch.optim.Adam(router.parameters(), lr=lr)
        for _ in range(epochs):
            loss = F.cross_entropy(router(x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy.append(float((router(x).logits.argmax(dim=-1) == y).float().mean()))
    return {"router_accuracy": accuracy, "oracle_tokens": int(sum(t.numel() for t in targets_L[0]))}


def duo_oracle_report(model: Any, batches: Sequence[Batch]) -> dict[str, Any]:
    """The oracle's loss (per-token best path), the loss of all tokens following their own
    oracle paths together, and the mean token difficulty."""
    stack = model.depth
    best, joint, difficulty, flops, count = 0.0, 0.0, 0.0, 0.0, 0
    big_share = 0.0
    with frozen(model):
        for inputs, targets in batches:
            oracle = duo_oracle(model, inputs, targets)
            stack.set_choices(path_choices(oracle["path_TL"], *inputs.shape))
            with stack.use_mode("given"):
                losses, fpt = token_losses(model, inputs, targets)
            stack.set_choices(None)
            n = losses.numel()
            best += float(oracle["loss_T"].sum())
            joint += float(losses.sum())
            difficulty += float(oracle["difficulty_T"].sum())
            big_share += float((oracle["path_TL"] == 2).float().mean()) * n
            flops += fpt * n
            count += n
    return {"val_loss": best / count, "joint_val_loss": joint / count, "flops_per_token": flops / count,
            "token_difficulty": difficulty / count, "big_share": big_share / count}


# --- Dr.LLM ------------------------------------------------------------------------------

def drllm_sequence_loss(model: Any, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[tuple[int, ...]], float]:
    stack = model.depth

    def loss_fn(counts: tuple[int, ...]) -> float:
        stack.set_decisions(torch.tensor([counts], dtype=torch.long))
        with stack.use_mode("given"):
            losses, _ = token_losses(model, inputs, targets)
        return float(losses.mean())
    return loss_fn


def drllm_targets(model: Any, batches: Sequence[Batch], *, simulations: int = 200, tolerance: float = 0.0,
                  seed: int = 0) -> tuple[list[Batch], torch.Tensor, list[float], list[float]]:
    """MCTS decisions ``[N, L]`` for every sequence, with the default and best losses."""
    sequences, decisions, base_losses, best_losses = [], [], [], []
    stack = model.depth
    with frozen(model):
        for inputs, targets in batches:
            for b in range(inputs.shape[0]):
                one = (inputs[b:b + 1], targets[b:b + 1])
                loss_fn = drllm_sequence_loss(model, *one)
                counts, loss, _ = mcts_paths(loss_fn, stack.n_layers, simulations=simulations, tolerance=tolerance,
                                             seed=seed + len(sequences))
                sequences.append(one)
                decisions.append(counts)
                base_losses.append(loss_fn((1,) * stack.n_layers))
                best_losses.append(loss)
    stack.set_decisions(None)
    return sequences, torch.tensor(decisions, dtype=torch.long), base_losses, best_losses


def fit_drllm_routers(model: Any, batches: Sequence[Batch], *, simulations: int = 200, epochs: int = 15,
                      lr: float = 1e-3, focal_gamma: float = 0.0, tolerance: float = 0.0) -> dict[str, Any]:
    """MCTS targets, then the routers learn them on the frozen LM (teacher forcing)."""
    stack = model.depth
    sequences, decisions, base, best = drllm_targets(model, batches, simulations=simulations, tolerance=tolerance)
    inputs_L: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(stack.n_layers)]
    with frozen(model), torch.no_grad():
        for (inputs, _), counts in zip(sequences, decisions):
            stack.set_decisions(counts.unsqueeze(0))
            stack.record_inputs = []
            with stack.use_mode("given"):
                model(inputs)
            for layer, pair in enumerate(stack.record_inputs):
                inputs_L[layer].append(pair)
            stack.record_inputs = None
    stack.set_decisions(None)
    accuracy = []
    for layer, router in enumerate(stack.routers):
        means = torch.cat([m for m, _ in inputs_L[layer]])
        valid = torch.cat([v for _, v in inputs_L[layer]])
        target = decisions[:, layer]
        optimizer = torch.optim.AdamW(router.parameters(), lr=lr)
        for _ in range(epochs):
            loss = focal_loss(router(means, valid), target, focal_gamma)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy.append(float((router(means, valid).argmax(dim=-1) == target).float().mean()))
    return {"router_accuracy": accuracy, "mcts_sequences": len(sequences),
            "mcts_default_loss": sum(base) / len(base), "mcts_best_loss": sum(best) / len(best),
            "mcts_decision_rates": {o: float((decisions == i).float().mean()) for i, o in
                                    enumerate(("skip", "execute", "repeat"))}}


def drllm_mcts_report(model: Any, batches: Sequence[Batch], *, simulations: int = 50) -> dict[str, Any]:
    """Loss and FLOPs when every validation sequence takes its own MCTS path (an oracle)."""
    stack = model.depth
    sequences, decisions, _, best = drllm_targets(model, batches, simulations=simulations)
    flops, count, loss_sum = 0.0, 0, 0.0
    with frozen(model):
        for (inputs, targets), counts in zip(sequences, decisions):
            stack.set_decisions(counts.unsqueeze(0))
            with stack.use_mode("given"):
                losses, fpt = token_losses(model, inputs, targets)
            loss_sum += float(losses.sum())
            flops += fpt * losses.numel()
            count += losses.numel()
    stack.set_decisions(None)
    return {"val_loss": loss_sum / count, "flops_per_token": flops / count}


# --- LFF ---------------------------------------------------------------------------------

def fit_lff(model: Any, batches: Sequence[Batch], *, epochs: int = 200, lr: float = 1e-2) -> dict[str, Any]:
    """Fit forecasters (MSE to the FFN output), scorers (MSE to the log error) and thresholds."""
    stack = model.depth
    stack.record_inputs = []
    with frozen(model), torch.no_grad(), stack.use_mode("execute"):
        for inputs, _ in batches:
            model(inputs)
    per_layer = len(model.blocks)
    records = stack.record_inputs
    stack.record_inputs = None
    mse, thresholds = [], []
    for layer, block in enumerate(model.blocks):
        h = torch.cat([records[i].reshape(-1, records[i].shape[-1]) for i in range(layer, len(records), per_layer)]).float()
        with torch.no_grad():
            y = block.ffn(h).float()
        forecaster, scorer = stack.forecasters[layer], stack.scorers[layer]
        optimizer = torch.optim.Adam(forecaster.parameters(), lr=lr)
        for _ in range(epochs):
            loss = F.mse_loss(forecaster(h), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            log_err = (forecaster(h) - y).norm(dim=-1).clamp_min(1e-8).log()
        optimizer = torch.optim.Adam(scorer.parameters(), lr=lr)
        for _ in range(epochs):
            loss = F.mse_loss(scorer(h).squeeze(-1), log_err)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            scores = scorer(h).squeeze(-1)
            threshold = float(torch.quantile(scores, 1 - stack.sparsity)) if stack.sparsity < 1 else float("-inf")
            stack.thresholds[layer] = threshold
            mse.append(float(F.mse_loss(forecaster(h), y) / y.pow(2).mean().clamp_min(1e-12)))
            thresholds.append(threshold)
    return {"forecast_relative_mse": mse, "thresholds": thresholds}


# --- dispatch ----------------------------------------------------------------------------

def fit_depth(model: Any, batches: Iterable[Any], **options: Any) -> dict[str, Any]:
    """Run the second training stage of the model's depth method (if it has one)."""
    stack = model.depth
    if stack is None:
        raise ConfigError("fit_depth needs a model with a depth_router.")
    pairs = as_pairs(batches)
    if stack.name == "duo":
        return fit_duo_routers(model, pairs, **options)
    if stack.name == "drllm":
        return fit_drllm_routers(model, pairs, **options)
    if stack.name == "lff":
        return fit_lff(model, pairs, **options)
    return {}


def mode_report(model: Any, batches: Iterable[Any], *, drllm_simulations: int = 50) -> dict[str, dict[str, Any]]:
    """Loss, FLOPs per token and option rates under every decision rule of the depth stack."""
    stack = model.depth
    pairs = as_pairs(batches)
    report = {}
    for mode in stack.modes:
        if mode == "given":
            continue
        report[mode] = evaluate_mode(model, pairs, mode)
    if stack.name == "duo":
        report["oracle"] = duo_oracle_report(model, pairs)
    if stack.name == "drllm":
        report["mcts"] = drllm_mcts_report(model, pairs, simulations=drllm_simulations)
    causal = {key: key in stack.causal_modes for key in report}
    if stack.name == "halting":  # the paper gives no threshold: sweep it
        configured = stack.threshold
        try:
            for theta in HALTING_SWEEP:
                stack.threshold = theta
                report[f"halt@{theta}"] = evaluate_mode(model, pairs, "halt")
                causal[f"halt@{theta}"] = True
        finally:
            stack.threshold = configured
    for key in report:
        report[key]["causal"] = causal[key]
    return report
