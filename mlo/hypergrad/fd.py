"""Identity-Hessian hypergradients: DARTS' second-order term (`aid_fd`) and SAMA (`sama`).

Both return −ξ ∂²f/∂φ∂θ · v: the one-step unrolled best response θ − ξ∇_θ f(θ, φ), differentiated
in φ. By default the mixed product is exact: the tangent of ∇_φ f along v (forward-over-reverse,
on lower levels of a million parameters or more, see `mixed_product`), or the shared implicit
kernel with the Hessian taken as I/ξ (one gradient graph ∇_θ f and one backward pass of
ξv · ∇_θ f to φ). Both differentiate the very gradient the inner step applies, so they respect
what that step respects: `.detach()`, `torch.no_grad()` regions and custom autograd functions
(whose backward must be differentiable, as for `itd` and `aid_cg`). `exact=False` keeps DARTS'
central finite difference of ∇_φ f along v, which differences the cost's *value* and so cannot see
a `.detach()` inside it.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode

from ._implicit import gradients, implicit_vjp
from ._method import Method, Params


def radius_for(r: float, dtype: torch.dtype | None) -> float:
    """Scale a float32 finite-difference radius to the compute dtype (optimal step ∝ eps^(1/3))."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return r
    return r * (torch.finfo(dtype).eps / torch.finfo(torch.float32).eps) ** (1 / 3)


def finite_difference(loss_fn, inner_params: Params, outer_params: Params, v: Params,
                      r: float, scale: float, dot=None) -> Params:
    """Return −scale · [∇_φ f(θ+εv, φ) − ∇_φ f(θ−εv, φ)] / 2ε with ε = r / ‖v‖ (‖v‖² = `dot`(v, v)
    where given: vectors split over ranks)."""
    keys = list(inner_params)
    directions = [v[k].detach() for k in keys]
    wide = {k: d.float() if d.dtype.itemsize < 4 else d for k, d in zip(keys, directions)}
    norm = math.sqrt(max(float(dot(wide, wide)), 0.0)) if dot is not None else float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in wide.values()])))
    if norm == 0.0 or not math.isfinite(norm):  # nothing to propagate, or nothing finite to
        fill = 0.0 if norm == 0.0 else float("nan")  # propagate (the caller's check sees NaN)
        return {k: torch.full_like(t, fill) for k, t in outer_params.items()}
    epsilon = r / norm
    with torch.no_grad():  # the perturbed points are constants: no graph for the inner params
        points = [p.detach() for p in inner_params.values()]
        plus = dict(zip(keys, torch._foreach_add(points, directions, alpha=epsilon)))
        minus = dict(zip(keys, torch._foreach_add(points, directions, alpha=-epsilon)))
    # one backward pass through f(θ+εv, ·) − f(θ−εv, ·) instead of one per point; plain autograd
    # (measured ~8% faster than torch.func.grad on an MLP, whose per-operation dispatch also
    # applies to the forward passes of the perturbed lower level, which record no graph)
    with torch.enable_grad():
        outer = {k: t.detach().requires_grad_() for k, t in outer_params.items()}
        difference = gradients(loss_fn(plus, outer) - loss_fn(minus, outer), outer)
    factor = -scale / (2 * epsilon)
    return {k: factor * d for k, d in difference.items()}


FORWARD_MIN_PARAMS = 1_000_000  # mode="auto": forward-over-reverse from this many θ entries


def mixed_product(loss_fn, inner_params: Params, outer_params: Params, v: Params,
                  scale: float, mode: str = "auto") -> Params:
    """Return −scale · ∂²f/∂φ∂θ · v exactly, in forward-over-reverse or reverse mode.

    Forward-over-reverse: θ enters as a dual tensor with tangent v (`torch.autograd.forward_ad`),
    and the tangent of ∇_φ f (one backward pass) is ∂²f/∂φ∂θ · v. Cost: the forward pass with its
    tangents and one backward pass to φ, keeping no second-order graph. Tangents stop at
    `.detach()`, as reverse mode does, but not at `torch.no_grad()`, and a custom autograd
    function needs a `jvp`: where the cost runs any operation with gradients disabled, or forward
    mode fails, the product is taken in reverse mode instead, with the same result.
    Reverse mode: the implicit kernel with the solve u = scale · v (one backward pass that keeps
    its graph, and one more of that graph to φ).

    `mode="auto"` takes forward-over-reverse where θ has at least `FORWARD_MIN_PARAMS` entries:
    measured on CPU (`python -m benchmarks --programs reweight`), it was 10% faster than reverse
    mode with 1.9M parameters (an MLP 784-1024-1024-10, where the large products dominate) and
    20-30% slower with 0.2M (784-256-10, where the per-operation cost of dual tensors does).
    Both modes compute the same quantity, to rounding.
    """
    _check_mode(mode)
    if mode == "auto":
        size = sum(t.numel() for t in inner_params.values())
        mode = "forward" if size >= FORWARD_MIN_PARAMS else "reverse"
    forward = _forward_over_reverse(loss_fn, inner_params, outer_params, v) \
        if mode == "forward" else None
    if forward is not None:
        return {k: -scale * t for k, t in forward.items()}

    def identity(hvp, w: Params) -> Params:
        return {k: scale * t for k, t in w.items()}

    return implicit_vjp(loss_fn, inner_params, outer_params, v, identity)


def _check_mode(mode: str) -> None:
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"aid_fd: mode must be 'auto', 'forward' or 'reverse', got {mode!r}.")


class _GradModeWatch(TorchFunctionMode):
    """Note whether any operation runs with gradients disabled (`torch.no_grad()` regions, which
    forward-mode tangents would cross where reverse mode stops)."""

    def __init__(self):
        super().__init__()
        self.disabled = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not torch.is_grad_enabled():
            self.disabled = True
        return func(*args, **(kwargs or {}))


def _forward_over_reverse(loss_fn, inner_params: Params, outer_params: Params,
                          v: Params) -> Params | None:
    """∂²f/∂φ∂θ · v as the tangent of ∇_φ f along θ's tangent v; None where forward mode would
    not give reverse mode's derivative (see `mixed_product`)."""
    try:
        with torch.enable_grad(), fwAD.dual_level(), _GradModeWatch() as watch:
            inner = {k: fwAD.make_dual(t.detach(), v[k].detach().to(t.dtype))
                     for k, t in inner_params.items()}
            outer = {k: t.detach().requires_grad_() for k, t in outer_params.items()}
            gradient = gradients(loss_fn(inner, outer), outer)
            tangents = {k: fwAD.unpack_dual(g).tangent for k, g in gradient.items()}
    except (RuntimeError, NotImplementedError):  # an operation without a forward derivative
        return None
    if watch.disabled:
        return None
    return {k: torch.zeros_like(outer_params[k]) if t is None else t.detach()
            for k, t in tangents.items()}


def aid_fd(r: float = 0.01, scale: float | None = None, exact: bool = True,
           mode: str = "auto") -> Method:
    """Take the Hessian as the identity: the one-step unrolled best response (DARTS, T1–T2).

    Computes (dθ*/dφ)ᵀ v ≈ −ξ ∂²f/∂φ∂θ · v, with ξ the inner level's current learning rate, or
    `scale` (scale=1 is the other common convention). With `exact=True` (default) the mixed
    product is exact and respects `.detach()`, `torch.no_grad()` and custom autograd functions in
    the inner cost, as `itd` and `aid_cg` do; cost: one forward pass with tangents and one
    backward pass (forward-over-reverse; a forward and two backward passes in reverse mode, where
    the cost has a `torch.no_grad()` region or an operation without a forward derivative). With
    `exact=False` it is DARTS' central difference −ξ [∇_φ f(θ+εv, φ) − ∇_φ f(θ−εv, φ)] / 2ε,
    ε = r/‖v‖ (the radius grows for float16/bfloat16 compute): two forward passes and one backward
    pass with no second-order graph, but it differences the cost's value, so a `.detach()` inside
    the inner cost is not respected (for Meta-Weight-Net's Σ w_φ(ℓ(θ).detach()) ℓ(θ) it also
    differentiates the weights' dependence on θ). `r` is used only when `exact=False`; `mode`
    ("auto", "forward", "reverse") only when `exact=True` (see `mixed_product`).

    >>> import torch
    >>> f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]
    >>> out = aid_fd(scale=1.0)(f, {"w": torch.zeros(2)}, {"lam": torch.ones(2)}, {"w": torch.ones(2)})
    >>> out["lam"]
    tensor([1., 1.])
    """
    def method(loss_fn, inner_params, outer_params, v, *, lr=None, dtype=None, dot=None,
               **context):
        xi = _xi("aid_fd", scale, lr)
        if exact:
            return mixed_product(loss_fn, inner_params, outer_params, v, xi, mode)
        return finite_difference(loss_fn, inner_params, outer_params, v, radius_for(r, dtype), xi,
                                 dot)

    _check_mode(mode)
    options = (("r", r), ("scale", scale), ("exact", exact)) + \
        ((("mode", mode),) if mode != "auto" else ())
    return Method("aid_fd", method, options)


def sama(r: float = 0.01, scale: float | None = None, exact: bool = True,
         mode: str = "auto") -> Method:
    """Identity-Hessian hypergradient with v preconditioned by the inner optimizer (SAMA).

    Computes `aid_fd` (same `exact`, `mode` and `r`) applied to P v, where P ≈ ∂(update)/∂(gradient) is
    diagonal: for Adam and AdamW P = 1/(√v̂ + eps) from the optimizer's second-moment state
    (bias-corrected); for SGD, for optimizers without a functional mirror, and before the first
    step P = I. Cost: as `aid_fd`. Use it when the inner level trains with Adam.

    >>> import torch
    >>> f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]
    >>> out = sama(scale=1.0)(f, {"w": torch.zeros(2)}, {"lam": torch.ones(2)}, {"w": torch.ones(2)})
    >>> out["lam"]
    tensor([1., 1.])
    """
    identity_hessian = aid_fd(r, scale, exact, mode)

    def method(loss_fn, inner_params, outer_params, v, *, lr=None, optimizer=None, state=None,
               **context):
        _xi("sama", scale, lr)
        if optimizer is not None:
            v = optimizer.precondition(v, state if state is not None else {})
        return identity_hessian(loss_fn, inner_params, outer_params, v, lr=lr, **context)

    return Method("sama", method, identity_hessian.options)


def _xi(name: str, scale, lr) -> float:
    if scale is not None:
        return scale
    if lr is None:
        raise TypeError(f"{name}: no step size; pass {name}(scale=...) or call with lr=.")
    return lr
