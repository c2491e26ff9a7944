"""Matrix-free linear solvers on parameter dicts: `solve(matvec, b, iters) -> x` with A x ≈ b.

Both run a fixed number of iterations with no host synchronisation, so they cost exactly `iters`
matrix-vector products (Hessian-vector products in implicit differentiation).
"""

from __future__ import annotations

from typing import Callable

import torch

Params = dict[str, torch.Tensor]


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha, x: Params, y: Params) -> Params:
    return {k: y[k] + alpha * x[k] for k in y}


def cg(matvec: Callable[[Params], Params], b: Params, iters: int = 10, damping: float = 0.0,
       dot: Callable[[Params, Params], torch.Tensor] | None = None) -> Params:
    """Solve (A + damping·I) x = b by conjugate gradient from x = 0, for symmetric positive A.

    `dot` is the inner product of two vectors (default: the sum of their entries' products; for
    vectors split over ranks, one that adds the ranks' parts). Cost: `iters` calls of `matvec`;
    memory: b, the three iterates and one product (updated in place, `b` left as it is). Exact
    after n iterations for an n-dimensional A (in exact arithmetic); once the residual vanishes
    later iterations change nothing. On an indefinite A it runs the same recurrence (no
    safeguard beyond `damping`), as plain CG does.

    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    >>> x = cg(lambda v: {"w": A @ v["w"]}, {"w": torch.tensor([1.0, 0.0])}, iters=2)
    >>> torch.allclose(A @ x["w"], torch.tensor([1.0, 0.0]), atol=1e-6)
    True
    """
    dot = dot or _dot
    x = {k: torch.zeros_like(t) for k, t in b.items()}
    residual = {k: t.clone() for k, t in b.items()}
    direction = {k: t.clone() for k, t in b.items()}
    rs = dot(residual, residual)
    for _ in range(iters):
        product = matvec(direction)
        if damping:
            product = _axpy(damping, direction, product)
        step = _divide(rs, dot(direction, product))
        for k in x:  # the iterates are updated in place: no vector-sized temporaries
            x[k].addcmul_(direction[k], step)
            residual[k].addcmul_(product[k], step, value=-1)
        product = None  # freed before the next product is computed
        rs_new = dot(residual, residual)
        beta = _divide(rs_new, rs)
        for k in direction:
            direction[k].mul_(beta).add_(residual[k])
        rs = rs_new
    return x


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is exactly 0 (a converged solve).

    The sign is kept: on an indefinite Hessian (a non-convex inner level away from its minimum)
    CG then behaves as plain CG does rather than taking an unbounded step.
    """
    return numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def neumann(matvec: Callable[[Params], Params], b: Params, iters: int = 10,
            alpha: float = 1.0) -> Params:
    """Approximate A⁻¹ b by the truncated Neumann series α Σ_{j=0..iters} (I − αA)^j b.

    Converges when 0 < α < 2 / λ_max(A). Cost: `iters` calls of `matvec`; memory: b, the term,
    the sum and one product (updated in place, `b` left as it is).

    >>> x = neumann(lambda v: {"w": 2 * v["w"]}, {"w": torch.ones(1)}, iters=30, alpha=0.4)
    >>> round(float(x["w"]), 6)
    0.5
    """
    term = {k: t.clone() for k, t in b.items()}
    total = {k: t.clone() for k, t in b.items()}
    for _ in range(iters):
        product = matvec(term)
        for k in total:
            term[k].add_(product[k], alpha=-alpha)
            total[k].add_(term[k])
        product = None  # freed before the next product is computed
    return {k: t.mul_(alpha) for k, t in total.items()}
