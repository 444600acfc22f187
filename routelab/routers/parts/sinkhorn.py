"""Entropic optimal transport between tokens and experts (Sinkhorn), solved in the log domain.

For a log-kernel ``L_TE`` (``z`` for Megatron's Sinkhorn router, ``C / xi`` for Selective
Sinkhorn Routing) the transport plan is ``Pi = diag(u) exp(L) diag(v)`` with uniform
marginals: every row sums to ``row_mass`` and every column to ``col_mass``
(``T * row_mass == E * col_mass``). Only the log-potentials ``f = log u`` and
``g = log v`` are iterated:

    f_t = log(row_mass) - LSE_e(L_te + g_e),    g_e = log(col_mass) - LSE_t(L_te + f_t).

The iteration stops when the mean absolute change of ``g`` (the relative change of the
column scaling ``v``) drops below ``tol``, or after ``max_iter`` iterations. After the
final column update every column sums to ``col_mass`` exactly (up to rounding); rows are
within the tolerance. Megatron stops on the absolute change of ``v``, which depends on the
scale of ``v`` and is meaningless once the potentials live in the log domain, hence the
relative criterion.

Two evaluations of the same iteration:

* the fast path keeps the potentials in the log domain but evaluates each ``LSE`` as a
  matrix-vector product against a row- (resp. column-) stabilised kernel
  ``exp(L - max)``, computed once; it is exact as long as the potentials span less than
  the float range (``exp`` of -87 in fp32), which holds for ordinary router logits;
* the robust path uses ``torch.logsumexp`` and is stable for any finite log-kernel (logits
  of +-1e4 included). The solver falls back to it when the fast path produces a
  non-finite value, and uses it directly when ``robust=True``.

Both are differentiable; callers choose between ``torch.no_grad()`` (detached transport)
and unrolled gradients through the iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from routelab.core.errors import ConfigError

CHECK_EVERY = 4  # convergence is tested every few iterations (each test synchronises)


@dataclass
class SinkhornPotentials:
    """Log-potentials of the plan ``log Pi = f[:, None] + L + g[None, :]``.

    Attributes:
        f_T, g_E: row and column log-potentials.
        iterations: iterations run.
        converged: whether the tolerance was met before the iteration cap.
        robust: whether the logsumexp path was used.
    """

    f_T: torch.Tensor
    g_E: torch.Tensor
    iterations: int
    converged: bool
    robust: bool

    def log_plan(self, log_kernel_TE: torch.Tensor) -> torch.Tensor:
        return self.f_T.unsqueeze(1) + log_kernel_TE + self.g_E.unsqueeze(0)


def check_sinkhorn_options(tol: float, max_iter: int) -> None:
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool)) or not tol >= 0 or math.isinf(tol):
        raise ConfigError(f"sinkhorn_tol must be a finite number >= 0, got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"sinkhorn_iters must be an integer >= 1 (the iteration cap), got {max_iter!r}.")


def sinkhorn_potentials(
    log_kernel_TE: torch.Tensor,
    *,
    row_mass: float,
    col_mass: float,
    tol: float = 1e-4,
    max_iter: int = 100,
    robust: bool = False,
) -> SinkhornPotentials:
    """Solve for the potentials of the uniform-marginal entropic transport plan of ``exp(L)``.

    Args:
        log_kernel_TE: fp32 ``[T, E]`` log-kernel (finite).
        row_mass, col_mass: mass of every row / column (``T*row_mass == E*col_mass``).
        tol: stop when ``mean |g_new - g| < tol`` (checked every few iterations).
        max_iter: iteration cap (each iteration is one row and one column update).
        robust: use logsumexp iterations from the start.
    """
    num_tokens, num_experts = log_kernel_TE.shape
    if num_tokens == 0 or num_experts == 0:
        empty = log_kernel_TE.new_zeros(num_tokens), log_kernel_TE.new_zeros(num_experts)
        return SinkhornPotentials(*empty, iterations=0, converged=True, robust=robust)
    log_row, log_col = math.log(row_mass), math.log(col_mass)
    if not robust:
        result = _fast_iterations(log_kernel_TE, log_row, log_col, tol, max_iter)
        if result is not None:
            return result
    return _robust_iterations(log_kernel_TE, log_row, log_col, tol, max_iter)


def _fast_iterations(
    log_kernel_TE: torch.Tensor, log_row: float, log_col: float, tol: float, max_iter: int
) -> SinkhornPotentials | None:
    """Matrix-vector iterations on stabilised kernels; None when a value left the float range."""
    row_max_T = log_kernel_TE.amax(dim=1)
    col_max_E = log_kernel_TE.amax(dim=0)
    kernel_rows_TE = torch.exp(log_kernel_TE - row_max_T.unsqueeze(1))
    kernel_cols_ET = torch.exp(log_kernel_TE - col_max_E.unsqueeze(0)).t()
    g_E = torch.zeros_like(col_max_E)
    f_T = torch.zeros_like(row_max_T)
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        g_max = g_E.max()
        f_T = log_row - row_max_T - g_max - torch.log(kernel_rows_TE @ torch.exp(g_E - g_max))
        f_max = f_T.max()
        g_new = log_col - col_max_E - f_max - torch.log(kernel_cols_ET @ torch.exp(f_T - f_max))
        delta = (g_new - g_E).detach().abs().mean()
        g_E = g_new
        if iterations % CHECK_EVERY == 0 or iterations == max_iter:
            if not bool(torch.isfinite(delta)):
                return None
            if float(delta) < tol:
                converged = True
                break
    if not (bool(torch.isfinite(f_T).all()) and bool(torch.isfinite(g_E).all())):
        return None
    return SinkhornPotentials(f_T, g_E, iterations=iterations, converged=converged, robust=False)


def _robust_iterations(
    log_kernel_TE: torch.Tensor, log_row: float, log_col: float, tol: float, max_iter: int
) -> SinkhornPotentials:
    g_E = log_kernel_TE.new_zeros(log_kernel_TE.shape[1])
    f_T = log_kernel_TE.new_zeros(log_kernel_TE.shape[0])
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        f_T = log_row - torch.logsumexp(log_kernel_TE + g_E.unsqueeze(0), dim=1)
        g_new = log_col - torch.logsumexp(log_kernel_TE + f_T.unsqueeze(1), dim=0)
        delta = (g_new - g_E).detach().abs().mean()
        g_E = g_new
        if (iterations % CHECK_EVERY == 0 or iterations == max_iter) and float(delta) < tol:
            converged = True
            break
    return SinkhornPotentials(f_T, g_E, iterations=iterations, converged=converged, robust=True)


def transport_plan(
    log_kernel_TE: torch.Tensor, *, row_mass: float, col_mass: float, tol: float = 1e-4, max_iter: int = 100
) -> torch.Tensor:
    """The plan ``Pi`` itself (tests and analysis; routers only need the potentials)."""
    pot = sinkhorn_potentials(log_kernel_TE, row_mass=row_mass, col_mass=col_mass, tol=tol, max_iter=max_iter)
    return torch.exp(pot.log_plan(log_kernel_TE))
