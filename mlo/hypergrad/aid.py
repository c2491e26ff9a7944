"""Approximate implicit differentiation: the shared kernel with a CG or a Neumann-series solver."""

from __future__ import annotations

from functools import partial

from .. import linsolve
from ._implicit import implicit_vjp
from ._method import Method


def aid_cg(iters: int = 10, damping: float = 0.0) -> Method:
    """Differentiate implicitly, solving the Hessian system by conjugate gradient.

    Computes (dθ*/dφ)ᵀ v ≈ −∂²f/∂φ∂θ · u with (H + damping·I) u = v solved by `iters` CG steps,
    H = ∂²f/∂θ². Exact at a minimum of a strongly convex inner cost once `iters` reaches the number
    of inner parameters. Cost: one gradient graph, `iters` Hessian-vector products and one mixed
    product (each one backward pass). Use it when the inner level is trained close to optimality.

    >>> import torch
    >>> A, B = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.eye(2)
    >>> f = lambda w, lam: 0.5 * w["w"] @ A @ w["w"] - w["w"] @ B @ lam["lam"]
    >>> out = aid_cg(iters=2)(f, {"w": torch.zeros(2)}, {"lam": torch.ones(2)}, {"w": torch.ones(2)})
    >>> out["lam"]  # Bᵀ A⁻¹ v
    tensor([0.5000, 0.2500])
    """
    def method(loss_fn, inner_params, outer_params, v, *, reduce=None, dot=None, **context):
        solve = partial(linsolve.cg, iters=iters, damping=damping, dot=dot)
        return implicit_vjp(loss_fn, inner_params, outer_params, v, solve, reduce)

    return Method("aid_cg", method, (("iters", iters), ("damping", damping)))


def aid_neumann(iters: int = 10, alpha: float | None = None) -> Method:
    """Differentiate implicitly, inverting the Hessian by a truncated Neumann series.

    Computes (dθ*/dφ)ᵀ v ≈ −∂²f/∂φ∂θ · α Σ_{j=0..iters} (I − αH)^j v. `alpha` defaults to the
    inner level's current learning rate (the series is then the linearisation of that many extra
    gradient steps); it must satisfy α < 2/λ_max(H). Cost: `iters` Hessian-vector products and one
    mixed product. Use it for large or ill-conditioned inner problems where CG is unstable.

    >>> import torch
    >>> f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]
    >>> out = aid_neumann(iters=5, alpha=1.0)(f, {"w": torch.zeros(2)}, {"lam": torch.ones(2)},
    ...                                      {"w": torch.ones(2)})
    >>> out["lam"]
    tensor([1., 1.])
    """
    def method(loss_fn, inner_params, outer_params, v, *, lr=None, reduce=None, **context):
        step = alpha if alpha is not None else lr
        if step is None:
            raise TypeError("aid_neumann: no alpha; pass aid_neumann(alpha=...) or call with lr=.")
        solve = partial(linsolve.neumann, iters=iters, alpha=step)
        return implicit_vjp(loss_fn, inner_params, outer_params, v, solve, reduce)

    return Method("aid_neumann", method, (("iters", iters), ("alpha", alpha)))
