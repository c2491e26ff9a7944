"""Finite-difference hypergradients: DARTS' second-order approximation, and SAMA."""

from __future__ import annotations

import torch
from torch.func import grad

from ._method import Method, Params


def radius_for(r: float, dtype: torch.dtype | None) -> float:
    """Scale a float32 finite-difference radius to the compute dtype (optimal step ∝ eps^(1/3))."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return r
    return r * (torch.finfo(dtype).eps / torch.finfo(torch.float32).eps) ** (1 / 3)


def finite_difference(loss_fn, inner_params: Params, outer_params: Params, v: Params,
                      r: float, scale: float) -> Params:
    """Return −scale · [∇_φ f(θ+εv, φ) − ∇_φ f(θ−εv, φ)] / 2ε with ε = r / ‖v‖."""
    norm = torch.sqrt(sum((t.detach().to(torch.promote_types(t.dtype, torch.float32)) ** 2).sum()
                           for t in v.values()))
    epsilon = r / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    with torch.no_grad():  # the perturbed points are constants: no graph for the inner params
        plus = {k: p + epsilon.to(p.dtype) * v[k] for k, p in inner_params.items()}
        minus = {k: p - epsilon.to(p.dtype) * v[k] for k, p in inner_params.items()}
    # one backward pass through f(θ+εv, ·) − f(θ−εv, ·) instead of one per point
    difference = grad(lambda outer: loss_fn(plus, outer) - loss_fn(minus, outer))(outer_params)
    factor = -scale / (2 * epsilon)
    return {k: (factor * d).to(d.dtype) for k, d in difference.items()}


def aid_fd(r: float = 0.01, scale: float | None = None) -> Method:
    """Approximate the mixed second derivative by central finite differences (DARTS, T1–T2).

    Computes (dθ*/dφ)ᵀ v ≈ −ξ [∇_φ f(θ+εv, φ) − ∇_φ f(θ−εv, φ)] / 2ε with ε = r/‖v‖, i.e. the
    one-step unrolled best response θ − ξ∇_θ f with ξ the inner level's current learning rate, or
    `scale` (Betty's convention is scale=1). The radius grows for float16/bfloat16 compute.
    Cost: two first-order backward passes, no second-order graph. Use it for large models.

    >>> import torch
    >>> f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]
    >>> out = aid_fd(scale=1.0)(f, {"w": torch.zeros(2)}, {"lam": torch.ones(2)}, {"w": torch.ones(2)})
    >>> torch.allclose(out["lam"], torch.ones(2))
    True
    """
    def method(loss_fn, inner_params, outer_params, v, *, lr=None, dtype=None, **context):
        xi = _xi("aid_fd", scale, lr)
        return finite_difference(loss_fn, inner_params, outer_params, v, radius_for(r, dtype), xi)

    return Method("aid_fd", method, (("r", r), ("scale", scale)))


def sama(r: float = 0.01, scale: float | None = None) -> Method:
    """Finite differences with v preconditioned by the inner optimizer's update rule (SAMA).

    Computes `aid_fd` applied to P v, where P ≈ ∂(update)/∂(gradient) is diagonal: for Adam and
    AdamW P = 1/(√v̂ + eps) from the optimizer's second-moment state (bias-corrected); for SGD and
    before the first step P = I. Cost: as `aid_fd`. Use it when the inner level trains with Adam.

    >>> import torch
    >>> f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]
    >>> out = sama(scale=1.0)(f, {"w": torch.zeros(2)}, {"lam": torch.ones(2)}, {"w": torch.ones(2)})
    >>> torch.allclose(out["lam"], torch.ones(2))
    True
    """
    def method(loss_fn, inner_params, outer_params, v, *, lr=None, dtype=None, optimizer=None,
               state=None, **context):
        xi = _xi("sama", scale, lr)
        if optimizer is not None:
            v = optimizer.precondition(v, state if state is not None else {})
        return finite_difference(loss_fn, inner_params, outer_params, v, radius_for(r, dtype), xi)

    return Method("sama", method, (("r", r), ("scale", scale)))


def _xi(name: str, scale, lr) -> float:
    if scale is not None:
        return scale
    if lr is None:
        raise TypeError(f"{name}: no step size; pass {name}(scale=...) or call with lr=.")
    return lr
