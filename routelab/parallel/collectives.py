"""Differentiable collectives over an expert-parallel group.

* ``all_to_all`` is ``torch.distributed``'s ``all_to_all_single`` with uneven splits and
  autograd (its backward is the reverse all-to-all), from
  ``torch.distributed._functional_collectives.all_to_all_single_autograd``.
* ``gather_rows`` concatenates every rank's rows (their counts may differ) on every rank.
  Its backward sums the incoming gradients over the ranks and keeps this rank's rows: each
  rank's loss may depend on every rank's rows (routing over the global batch), and the
  gradient of the sum of the ranks' losses is what data parallelism then averages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


def all_to_all(
    x_NC: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Send ``input_splits[j]`` consecutive rows to rank ``j``; receive ``output_splits[j]`` rows from it."""
    out = all_to_all_single_autograd(x_NC.contiguous(), output_splits, input_splits, group)
    return wait_tensor(out) if not out.requires_grad else out


def gather_counts(count: int, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Every rank's ``count``, in rank order (one small all-gather)."""
    size = dist.get_world_size(group)
    local = torch.tensor([count], dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(out, local, group=group)
    return [int(t.item()) for t in out]


def _gather_padded(rows_TF: torch.Tensor, counts: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    rows = max(counts) if counts else 0
    padded = rows_TF.new_zeros((rows, *rows_TF.shape[1:]))
    padded[: rows_TF.shape[0]] = rows_TF
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_TF, counts, rank, group):  # type: ignore[override]  # noqa: ANN001
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        return _gather_padded(rows_TF, counts, group)

    @staticmethod
    def backward(ctx, grad_TF: torch.Tensor):  # type: ignore[override]
        grad = grad_TF.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


def gather_rows(rows_TF: torch.Tensor, counts: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """``cat`` of every rank's ``rows_TF`` (rank ``j`` holds ``counts[j]`` rows), differentiable."""
    rank = dist.get_rank(group)
    if rows_TF.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(rows_TF, counts, rank, group)
    return _gather_padded(rows_TF.detach() if not rows_TF.requires_grad else rows_TF, counts, group)
