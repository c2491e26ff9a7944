"""Iterative differentiation: reverse mode through the inner level's unrolled optimizer steps."""

from __future__ import annotations

import torch

from ..optim import FunctionalOptimizer, sgd
from ._method import Method


def itd(steps: int = 1, first_order: bool = False) -> Method:
    """Differentiate through the inner optimizer's recorded steps (ITD, reverse-mode).

    With θ_0 = `inner_params` and θ_{t+1} = update(θ_t, ∇_θ f_t(θ_t, φ)), returns (dθ_T/dφ)ᵀ v.
    `loss_fn` is one cost used for `steps` steps, or a sequence of costs (one per step, e.g. on
    each step's batch); `optimizer` is a `mlo.optim.FunctionalOptimizer` (or one per step, when
    hyperparameters were scheduled) with `state` its state at θ_0; without one, `lr=` gives plain
    SGD. `optimizer` may also be a function of the outer params returning either: the update then
    reads learned hyperparameters (a learned learning rate) from them and is differentiated in
    them. `init`, a function of the outer params returning θ_0, makes the start differentiable
    (θ_0 = φ: MAML). `first_order=True` holds each step's gradient ∇_θ f_t constant (FOMAML):
    only the paths through θ_0 and the update's own hyperparameters remain, and no second-order
    graph is built. Inside a `Program` the inner level's recorded steps since the upper level's
    last step are replayed with the functional mirror of its own optimizer. Cost: T forward and
    backward passes kept for a second backward: memory grows with T.

    >>> f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]
    >>> out = itd(steps=2)(f, {"w": torch.zeros(1)}, {"lam": torch.ones(1)}, {"w": torch.ones(1)},
    ...                     lr=0.5)
    >>> out["lam"]  # θ_2 = (1 - (1 - 0.5)²) λ
    tensor([0.7500])
    >>> maml = itd(steps=2)(f, {"w": torch.zeros(1)}, {"lam": torch.ones(1)}, {"w": torch.ones(1)},
    ...                      lr=0.5, init=lambda outer: {"w": outer["lam"]})
    >>> maml["lam"]  # θ_0 = λ: θ_2 = λ, so the start adds (1 - 0.5)² to 0.75
    tensor([1.])
    """
    def method(loss_fn, inner_params, outer_params, v, *, optimizer=None, state=None, lr=None,
               init=None, **context):
        losses = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn] * steps
        if optimizer is None:
            if lr is None:
                raise TypeError("itd: no update rule; pass optimizer= (mlo.optim) or lr=.")
            optimizer = sgd(inner_params, lr=lr)
        with torch.enable_grad():
            outer = {k: t.detach().requires_grad_() for k, t in outer_params.items()}
            if callable(optimizer) and not isinstance(optimizer, FunctionalOptimizer):
                optimizer = optimizer(outer)
            updates = list(optimizer) if isinstance(optimizer, (list, tuple)) \
                else [optimizer] * len(losses)
            # a view is a node of its own: ∇_θ f then excludes f's dependence on φ through θ₀ = φ
            params = {k: t.view_as(t) for k, t in init(outer).items()} if init is not None \
                else {k: t.detach().requires_grad_() for k, t in inner_params.items()}
            opt_state = state or {}
            for f, update in zip(losses, updates):
                params, opt_state = _unrolled_step(f, update, params, outer, opt_state,
                                                   not first_order)
            names = [k for k in params if params[k].requires_grad]
            grads = torch.autograd.grad([params[k] for k in names], list(outer.values()),
                                        grad_outputs=[v[k] for k in names], allow_unused=True) \
                if names else [None] * len(outer)
        return {k: torch.zeros_like(t) if g is None else g
                for (k, t), g in zip(outer.items(), grads)}

    options = (("steps", steps),) + ((("first_order", True),) if first_order else ())
    return Method("itd", method, options)


def _unrolled_step(f, update: FunctionalOptimizer, params, outer, opt_state, second_order):
    names = list(params)
    grads = torch.autograd.grad(f(params, outer), [params[k] for k in names],
                                create_graph=second_order, allow_unused=True)
    grads = {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)}
    return update.step(params, grads, opt_state)
