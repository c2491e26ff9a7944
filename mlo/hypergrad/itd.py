"""Iterative differentiation: reverse mode through the inner level's unrolled optimizer steps."""

from __future__ import annotations

import torch

from ..optim import FunctionalOptimizer, sgd
from ._implicit import ConstantGradient
from ._method import Method


def itd(steps: int = 1, first_order: bool = False, recompute: bool = False,
        offload: bool = False, keep_every: int = 1) -> Method:
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
    graph is built. Inside a `Program` the inner level's real steps record the graph (see
    `mlo.live`), or its recorded steps since the upper level's last step are replayed with the
    functional mirror of its own optimizer. Cost: T forward and backward passes kept for a second
    backward: memory grows with T, by one step's double-backward graph per step.

    `recompute=True` trades time for memory: only each step's starting point (θ_t and the
    optimizer state) is kept, and the reverse pass rebuilds one step's graph at a time from it,
    λ_t = (∂θ_{t+1}/∂θ_t)ᵀ λ_{t+1} (the vector-Jacobian product of the update, Hessian included)
    and the outer parameters' share (∂θ_{t+1}/∂φ)ᵀ λ_{t+1}. Same result (to rounding); memory:
    T copies of the parameters and optimizer state plus one step's graph; time: one more forward
    and backward pass per step than recording the graph (none more than a replay: inside a
    `Program` the real steps' values are kept, so nothing is taken twice). `offload=True` keeps
    those copies in CPU memory (for a lower level on a GPU) and brings each back for its step.
    `keep_every=k` keeps only every k-th step's starting point; the reverse pass recomputes the
    others of a segment, without any graph, from the segment's kept start when it reaches them
    (checkpointing of the unroll): memory T/k + k copies (k ≈ √T is least), time one more forward
    and backward pass for the steps not kept.

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
               init=None, trajectory=None, **context):
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
            if recompute:
                return _recomputed(losses, updates, inner_params, state or {}, outer, v, init,
                                   not first_order, trajectory, offload, keep_every)
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

    options = (("steps", steps),) + ((("first_order", True),) if first_order else ()) \
        + ((("recompute", True),) if recompute else ()) + ((("offload", True),) if offload else ()) \
        + ((("keep_every", keep_every),) if keep_every != 1 else ())
    if not isinstance(keep_every, int) or keep_every < 1 or (keep_every != 1 and not recompute):
        raise ValueError(f"itd: keep_every must be a positive integer and needs recompute=True; "
                         f"got keep_every={keep_every!r}, recompute={recompute!r}.")
    return Method("itd", method, options)


def _unrolled_step(f, update: FunctionalOptimizer, params, outer, opt_state, second_order):
    names = list(params)
    grads = torch.autograd.grad(f(params, outer), [params[k] for k in names],
                                create_graph=second_order, allow_unused=True)
    if all(g is None for g in grads):  # the cost does not read θ: no step ever moves it
        raise ConstantGradient("the cost does not reach the inner parameters")
    return update.step(params, dict(zip(names, grads)), opt_state)  # None: not updated


def _recomputed(losses, updates, start, state, outer, v, init, second_order, trajectory, offload,
                keep_every=1):
    """ITD's reverse pass one step at a time, from each step's kept starting point.

    `trajectory` lists (θ_t, state_t) for t = 1 … T−1, None where not kept (a `Program` keeps
    them from its real steps); without it a forward pass without any graph computes them. θ_0 is
    `start`, or init(outer) for a differentiable start. A missing point is recomputed, with its
    segment, from the last kept one.
    """
    device = next(iter(start.values())).device
    if init is not None:
        with torch.no_grad():
            start = init(outer)
    kept = [(_kept(start, False), _kept(state, False))]
    if trajectory is None:
        trajectory = _forward(losses[:-1], updates[:-1], start, state, outer, device, offload,
                              keep_every)
    kept += list(trajectory)
    adjoint, state_adjoint = dict(v), {}
    result = {k: torch.zeros_like(t) for k, t in outer.items()}
    segment = {}  # the recomputed points of the segment the pass is in
    for t in reversed(range(len(losses))):
        point = kept[t] if kept[t] is not None else segment.pop(t, None)
        if point is None:  # recompute the segment up to t from its kept start
            s = max(i for i in range(t) if kept[i] is not None)
            segment = dict(enumerate(_forward(losses[s:t], updates[s:t], *kept[s], outer, device,
                                              False), start=s + 1))
            point = segment.pop(t)
        values, opt_state = point
        params = {k: x.view_as(x) for k, x in init(outer).items()} if t == 0 and init is not None \
            else {k: _to(x, device).requires_grad_() for k, x in values.items()}
        opt_state = {k: {n: _to(x, device).requires_grad_() if _float(n, x) else _to(x, device)
                         for n, x in entry.items()} for k, entry in opt_state.items()}
        adjoint, state_adjoint, grads = _step_vjp(
            losses[t], updates[t], params, opt_state, outer, adjoint, state_adjoint,
            second_order, params_are_leaves=not (t == 0 and init is not None))
        for key, g in grads.items():
            result[key] = result[key] + g
    return result


def _step_vjp(f, update, params, opt_state, outer, adjoint, state_adjoint, second_order,
              params_are_leaves=True):
    """One step of the reverse pass: rebuild θ_{t+1}, state_{t+1} from `params`, `opt_state`
    and pull (adjoint, state_adjoint) back through it. Returns the adjoints of θ_t and state_t
    and the outer parameters' share {key: gradient} (where it is not zero)."""
    new_params, new_state = _unrolled_step(f, update, params, outer, opt_state, second_order)
    outputs = [(new_params[k], adjoint[k]) for k in new_params if new_params[k].requires_grad]
    outputs += [(new_state[k][n], a) for k, entry in state_adjoint.items()
                for n, a in entry.items() if new_state[k][n].requires_grad]
    leaves = list(params.items()) if params_are_leaves else []
    state_leaves = [((k, n), x) for k, entry in opt_state.items() for n, x in entry.items()
                    if x.requires_grad]
    inputs = [x for _, x in leaves] + [x for _, x in state_leaves] + list(outer.values())
    grads = torch.autograd.grad([o for o, _ in outputs], inputs, [a for _, a in outputs],
                                allow_unused=True) if outputs else [None] * len(inputs)
    adjoint = {k: torch.zeros_like(x) if g is None else g for (k, x), g in zip(leaves, grads)}
    state_adjoint = {}
    for ((k, n), _), g in zip(state_leaves, grads[len(leaves):]):
        if g is not None:
            state_adjoint.setdefault(k, {})[n] = g
    shares = {key: g for key, g in zip(outer, grads[len(leaves) + len(state_leaves):])
              if g is not None}
    return adjoint, state_adjoint, shares


def _forward(losses, updates, start, state, outer, device, offload: bool,
             keep_every: int = 1) -> list:
    """θ_t and the optimizer state after each of the given steps, with no graph kept (None for
    the steps not kept: every `keep_every`-th is)."""
    points, params = [], {k: _to(t, device) for k, t in start.items()}
    state = {k: {n: _to(x, device) for n, x in entry.items()} for k, entry in state.items()}
    frozen = {k: t.detach() for k, t in outer.items()}
    for step, (f, update) in enumerate(zip(losses, updates), start=1):
        params = {k: t.detach().requires_grad_() for k, t in params.items()}
        grads = dict(zip(params, torch.autograd.grad(f(params, frozen), list(params.values()),
                                                     allow_unused=True)))
        with torch.no_grad():
            params, state = update.step({k: t.detach() for k, t in params.items()}, grads, state)
        points.append((_kept(params, offload), _kept(state, offload))
                      if step % keep_every == 0 else None)
    return points


def _kept(tree: dict, offload: bool) -> dict:
    """A detached copy of a {name: tensor} or {name: {name: tensor}} dict (on the CPU with
    `offload`)."""
    def keep(x):
        x = x.detach()
        return x.to("cpu", copy=True) if offload else x
    return {k: {n: keep(x) for n, x in v.items()} if isinstance(v, dict) else keep(v)
            for k, v in tree.items()}


def _to(x: torch.Tensor, device) -> torch.Tensor:
    return x.detach().to(device)  # no copy where it is there already


def _float(name: str, x: torch.Tensor) -> bool:
    """Whether an optimizer state entry carries derivatives (moments do; Adam's step count not)."""
    return name != "step" and x.is_floating_point()
