"""Routing under expert parallelism: scores on the token's own rank, selection over the global batch.

Each rank scores its own tokens (the scorer's ``x_TD @ W`` and any per-token state stay
local). The logits, ``[T_r, E]`` per rank, are then gathered, and every rank runs the
rest of the router (score function, balancing bias, selector, gate normalisation,
losses, capacity and statistics) on the logits of the *global* batch: the concatenation
of the ranks' batches in rank order. So every method whose selection couples tokens
(capacity per expert, expert choice, Sinkhorn, BIP/quantile balancing), every balance
loss and every balancer statistic sees exactly what it would see in one process on the
concatenated batch, and stateful balancers (loss-free bias) update identically on all
ranks. Exchanging ``E`` numbers per token is cheap next to the ``k * D`` numbers per
token the dispatch moves.

``router_inputs="tokens"`` gathers the hidden states instead and routes the whole global
batch on every rank: needed for routers whose later parts read the activations
(similarity-aware token graphs) or whose scorer leaves per-token side results for them
(noisy top-k's noise scale, ProMoE's prototypes, the recurrent router's state) and for
routers whose scorer keeps state learnt from the tokens (online k-means): every rank then
updates it from the same global batch. The default ``auto`` chooses it for those routers.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from routelab.core.context import RoutingContext, TokenBatch
from routelab.core.errors import ConfigError
from routelab.core.routing import Routing
from routelab.parallel.collectives import gather_counts, gather_rows
from routelab.routers import Router, RoutingDraft

ROUTER_INPUTS = ("auto", "logits", "tokens")
# router parts that read the hidden states after the scorer (tests/parallel/test_routing.py
# checks every registered preset against this list)
ACTIVATION_READERS = ("TokenGraphSoftmax",)


class _GatheredLogits(nn.Module):
    """Stands in for the scorer while the router runs on logits gathered from all ranks."""

    def __init__(self, logits_TE: torch.Tensor) -> None:
        super().__init__()
        self.logits_TE = logits_TE

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return self.logits_TE


def check_router_supported(router: Router) -> None:
    """Refuse routers that cannot run with their experts spread over ranks."""
    for name, module in router.named_modules():
        if getattr(module, "uses_experts", False):
            raise ConfigError(
                f"router {router.name!r} reads the experts' weights (part {name or type(module).__name__}); under "
                "expert parallelism each rank holds only its own experts, so it cannot run expert-parallel."
            )


def global_batch(batch: TokenBatch, group: dist.ProcessGroup, token_counts: list[int]) -> TokenBatch:
    """The ``TokenBatch`` of the concatenation of every rank's batch (same ``seq_len`` on all ranks)."""
    device = batch.flat_index_T.device
    meta = torch.tensor(
        [batch.batch_size, batch.seq_len, int(batch.token_ids_T is not None),
         int(batch.context.timestep is not None), int(batch.context.attention is not None)],
        dtype=torch.int64, device=device,
    )
    parts = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, meta, group=group)
    table = torch.stack(parts).tolist()
    seq_lens = {row[1] for row in table}
    if len(seq_lens) != 1:
        raise ConfigError(
            f"every rank must pass batches of the same sequence length under expert parallelism, got {sorted(seq_lens)}."
        )
    for column, what in ((2, "token ids"), (3, "a timestep"), (4, "attention weights")):
        if len({row[column] for row in table}) != 1:
            raise ConfigError(
                f"some ranks pass {what} to the router and others do not; pass the same inputs on every rank."
            )
    seq_len = batch.seq_len
    batch_sizes = [row[0] for row in table]
    rank = dist.get_rank(group)
    seq_offset = sum(batch_sizes[:rank])
    flat = gather_rows(batch.flat_index_T + seq_offset * seq_len, token_counts, group)
    lengths = gather_rows(batch.seq_lengths_B, batch_sizes, group)
    ids = gather_rows(batch.token_ids_T, token_counts, group) if table[0][2] else None
    context = batch.context
    timestep = gather_rows(context.timestep, batch_sizes, group) if table[0][3] else None
    attention = gather_rows(context.attention, batch_sizes, group) if table[0][4] else None
    global_context = RoutingContext(timestep=timestep, attention=attention, carry=context.carry)
    total = sum(batch_sizes)
    seq_id = torch.div(flat, max(seq_len, 1), rounding_mode="floor")
    has_padding = int(flat.numel()) != total * seq_len
    return TokenBatch(total, seq_len, flat, seq_id, flat - seq_id * seq_len, lengths, ids, global_context, has_padding)


def reads_activations_after_scoring(router: Router) -> bool:
    """True for routers with a part after the scorer that reads the hidden states themselves."""
    return any(type(module).__name__ in ACTIVATION_READERS for module in router.modules())


def has_stateful_scorer(router: Router) -> bool:
    """True when the scorer keeps state updated from the tokens it sees (online k-means
    centroids): it must see the global batch, on every rank, to stay identical everywhere."""
    return any(callable(getattr(module, "end_of_step", None)) for module in router.scorer.modules())


def adopt_global_observations(router: Router, data_parallel_copies: int) -> None:
    """Stateful parts (balancers, k-means) sum their observations over the default process
    group, as data parallelism needs. Under expert parallelism every rank of an EP group
    already observes that group's whole batch, so with one EP group their own reduction is
    switched off; with several copies it stays on and counts each batch ``N`` times, which
    the scale-free updates ignore (sign/proportional bias steps, averaged duals, means) and a
    count-weighted state cannot: routers with a stateful scorer are refused then."""
    if data_parallel_copies == 1:
        for module in router.modules():
            if isinstance(getattr(module, "all_reduce", None), bool):
                module.all_reduce = False
    elif has_stateful_scorer(router):
        raise ConfigError(
            f"router {router.name!r} keeps scorer state weighted by token counts (online k-means); with "
            f"{data_parallel_copies} copies of each expert group its statistics would be counted "
            f"{data_parallel_copies}x per rank group. Use --expert-parallel equal to the number of processes."
        )


def score_locally(router: Router, x_TD: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, list[str]]:
    """``logits_TE`` of this rank's tokens, and the names of any per-token results the scorer left for later parts."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        draft = RoutingDraft(x_TD=x_TD.float(), batch=batch, num_experts=router.num_experts, top_k=router.top_k,
                             training=router.training)
        logits_TE = router.scorer(draft.x_TD, draft).float()
    return logits_TE, sorted(draft.extras) + sorted(draft.extra_stats)


def route_from_logits(router: Router, logits_GE: torch.Tensor, batch: TokenBatch, d_model: int) -> Routing:
    """Run ``router`` after its scorer (score function, bias, selector, gates, losses, capacity,
    statistics) on given logits; the hidden states are not available to its parts."""
    placeholder_GD = logits_GE.new_zeros(()).expand(logits_GE.shape[0], d_model)
    scorer = router._modules["scorer"]
    router._modules["scorer"] = _GatheredLogits(logits_GE)
    try:
        return router(placeholder_GD, batch)
    finally:
        router._modules["scorer"] = scorer


def route_global(
    router: Router, x_TD: torch.Tensor, batch: TokenBatch, group: dist.ProcessGroup, router_inputs: str = "auto"
) -> tuple[Routing, Routing, list[int], str]:
    """Route this rank's real tokens ``x_TD`` as part of the global batch.

    Returns ``(local, global, counts, inputs)``: this rank's rows of the routing (with the
    global-batch losses, statistics and capacity), the routing of the whole global batch,
    the number of real tokens of each rank, and what was gathered (``logits`` or
    ``tokens``; ``auto`` picks ``tokens`` for routers that need it, the same on every rank).
    """
    if router_inputs not in ROUTER_INPUTS:
        raise ConfigError(f"router_inputs={router_inputs!r} must be one of {ROUTER_INPUTS}.")
    counts = gather_counts(x_TD.shape[0], group, x_TD.device)
    rank = dist.get_rank(group)
    offset = sum(counts[:rank])
    batch_G = global_batch(batch, group, counts)
    if router_inputs == "auto" and (reads_activations_after_scoring(router) or has_stateful_scorer(router)):
        router_inputs = "tokens"
    if router_inputs != "tokens":
        rng = torch.get_rng_state()
        logits_TE, leftovers = score_locally(router, x_TD, batch)
        if leftovers and router_inputs == "logits":
            raise ConfigError(
                f"router {router.name!r}: its scorer leaves per-token results ({leftovers}) for later parts, so it "
                "cannot route from gathered logits; use router_inputs='tokens' (or 'auto')."
            )
        if leftovers:
            torch.set_rng_state(rng)  # the scorer runs again on the global batch
            router_inputs = "tokens"
        else:
            router_inputs = "logits"
    if router_inputs == "tokens":
        routing = router(gather_rows(x_TD, counts, group), batch_G)
    else:
        routing = route_from_logits(router, gather_rows(logits_TE, counts, group), batch_G, x_TD.shape[1])
    rows = slice(offset, offset + counts[rank])
    local = replace(routing, topk_idx=routing.topk_idx[rows], topk_weight=routing.topk_weight[rows],
                    logits=routing.logits[rows], scores=routing.scores[rows])
    return local, routing, counts, router_inputs
