"""The implicit-differentiation kernel shared by `aid_cg` and `aid_neumann`.

At a solution θ* of min_θ f(θ, φ), ∇_θ f(θ*, φ) = 0, so dθ*/dφ = −H⁻¹ ∂²f/∂θ∂φ with H = ∂²f/∂θ².
Hence (dθ*/dφ)ᵀ v = −∂²f/∂φ∂θ · u with H u = v. One reverse-mode linearisation of the map
(θ, φ) ↦ ∇_θ f(θ, φ) gives both products: its VJP with w is (H w, ∂²f/∂φ∂θ · w), so the gradient
graph is built once and each Hessian-vector product is one backward pass through it.
"""

from __future__ import annotations

from typing import Callable

from torch.func import grad, vjp

from ._method import Params


def implicit_vjp(loss_fn, inner_params: Params, outer_params: Params, v: Params,
                 solve: Callable[[Callable[[Params], Params], Params], Params],
                 reduce: Callable[[Params], Params] | None = None) -> Params:
    """Return −∂²f/∂φ∂θ · solve(H, v) for f = loss_fn(inner_params, outer_params).

    `reduce` (data parallelism) averages each Hessian-vector product over ranks, so that H is the
    Hessian of the mean of the ranks' costs.
    """
    _, linearized = vjp(grad(loss_fn, argnums=0), inner_params, outer_params)
    if reduce is None:
        u = solve(lambda w: linearized(w)[0], v)
    else:
        u = solve(lambda w: reduce(linearized(w)[0]), v)
    return {k: -t for k, t in linearized(u)[1].items()}
