"""The implicit-differentiation kernel shared by `aid_cg` and `aid_neumann`.

At a solution θ* of min_θ f(θ, φ), ∇_θ f(θ*, φ) = 0, so dθ*/dφ = −H⁻¹ ∂²f/∂θ∂φ with H = ∂²f/∂θ².
Hence (dθ*/dφ)ᵀ v = −∂²f/∂φ∂θ · u with H u = v. The gradient graph g = ∇_θ f(θ, φ) is built once;
each Hessian-vector product H w is one backward pass of g·w to θ, and the mixed product one
backward pass of g·u to φ. Products are taken to θ alone (not also to φ, as a VJP of the whole map
(θ, φ) ↦ g would), so no backward pass computes a cotangent nobody uses.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._method import Params


class ConstantGradient(ValueError):
    """The cost's gradient in the inner parameters depends on neither them nor the outer
    parameters: both second derivatives are zero, and no solution depends on φ through it (a
    cost that reads its level's parameters only through other levels' solutions)."""


def implicit_vjp(loss_fn, inner_params: Params, outer_params: Params, v: Params,
                 solve: Callable[[Callable[[Params], Params], Params], Params],
                 reduce: Callable[[Params], Params] | None = None) -> Params:
    """Return −∂²f/∂φ∂θ · solve(H, v) for f = loss_fn(inner_params, outer_params).

    `reduce` (data parallelism) averages each Hessian-vector product over ranks, so that H is the
    Hessian of the mean of the ranks' costs.
    """
    with torch.enable_grad():
        inner = {k: t.detach().requires_grad_() for k, t in inner_params.items()}
        outer = {k: t.detach().requires_grad_() for k, t in outer_params.items()}
        gradient = gradients(loss_fn(inner, outer), inner, create_graph=True)
        if not any(g.requires_grad for g in gradient.values()):
            raise ConstantGradient("the cost's gradient in the inner parameters is constant")

        def hvp(w: Params) -> Params:
            product = gradients(gradient, inner, w, retain_graph=True)
            return reduce(product) if reduce is not None else product

        u = solve(hvp, v)
        mixed = gradients(gradient, outer, u)
    return {k: -t for k, t in mixed.items()}


def gradients(outputs, inputs: Params, cotangents: Params | None = None, **options) -> Params:
    """torch.autograd.grad on parameter dicts (`outputs` a scalar, or a dict matched by key with
    `cotangents`); an input the outputs do not reach gets zeros."""
    if isinstance(outputs, dict):
        outputs, cotangents = list(outputs.values()), [cotangents[k] for k in outputs]
    keys = list(inputs)
    grads = torch.autograd.grad(outputs, [inputs[k] for k in keys], cotangents,
                                allow_unused=True, **options)
    return {k: torch.zeros_like(inputs[k]) if g is None else g for k, g in zip(keys, grads)}
