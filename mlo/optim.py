"""Functional mirrors of torch.optim updates, for differentiating through unrolled inner steps.

`FunctionalOptimizer.from_optimizer(optimizer, named_params)` reads a torch optimizer's param
groups (one hyperparameter set per parameter name) and mirrors its update as a differentiable pure
function `step(params, grads, state) -> (params, state)`. Supported: SGD (momentum, dampening,
Nesterov, weight decay, maximize), Adam and AdamW (without amsgrad).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .errors import OptimizerError

Params = dict[str, torch.Tensor]
SUPPORTED = ("SGD", "Adam", "AdamW")
# optimizer -> (what its snapshot was taken of, the snapshot): one per step is read on every
# recorded step of a level, and its hyperparameters rarely change between steps
_SNAPSHOTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FunctionalOptimizer:
    """A differentiable update rule: `kind` and per-parameter hyperparameters (lr, betas, ...)."""

    kind: str
    hyper: dict[str, dict]
    clip_grad: float | None = None

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, named_params: Params,
                       clip_grad: float | None = None, level: str = "?") -> "FunctionalOptimizer":
        """Snapshot `optimizer`'s hyperparameters for each of `named_params`.

        The snapshot is immutable, so the previous one is returned while the param groups hold
        the same parameters and equal hyperparameters (a scheduler's new learning rate makes a
        new one); hyperparameters that are tensors (a learned learning rate) are copied anew
        every time.
        """
        key = _snapshot_key(optimizer, named_params, clip_grad)
        cached = _SNAPSHOTS.get(optimizer) if key is not None else None
        if cached is not None and cached[0] == key:
            return cached[1]
        kind = type(optimizer).__name__
        if kind not in SUPPORTED:
            raise OptimizerError(
                f"itd: level '{level}' uses {kind}, which has no functional mirror; supported: "
                f"{', '.join(SUPPORTED)}. Use one of them on that level, or a method that does "
                f"not unroll the optimizer (aid_cg, aid_neumann, aid_fd).")
        by_id = {}
        for group in optimizer.param_groups:
            if group.get("amsgrad"):
                raise OptimizerError(f"itd: level '{level}' uses {kind}(amsgrad=True), which has "
                                     f"no functional mirror; set amsgrad=False.")
            # one snapshot per group, shared by its parameters; a tensor hyperparameter (a
            # learned learning rate) is copied: its owner may step before the replay
            values = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                      for k, v in group.items() if k != "params"}
            by_id.update((id(p), values) for p in group["params"])
        rule = cls(kind, {name: by_id[id(p)] for name, p in named_params.items()}, clip_grad)
        if key is not None:
            _SNAPSHOTS[optimizer] = (key, rule)
        return rule

    def replace(self, values: dict[tuple[str, str], torch.Tensor]) -> "FunctionalOptimizer":
        """Return this update rule with hyperparameters replaced, keyed (parameter, name).

        >>> rule = sgd({"w": torch.zeros(1)}, lr=0.1).replace({("w", "lr"): torch.tensor(0.5)})
        >>> rule.hyper["w"]["lr"]
        tensor(0.5000)
        """
        hyper = {name: dict(group) for name, group in self.hyper.items()}
        for (name, key), value in values.items():
            hyper[name][key] = value
        return FunctionalOptimizer(self.kind, hyper, self.clip_grad)

    def state(self, optimizer: torch.optim.Optimizer, named_params: Params,
              copy: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Return `optimizer`'s state per parameter name (cloned unless `copy=False`)."""
        out = {}
        for name, p in named_params.items():
            entry = optimizer.state.get(p, {})
            out[name] = {k: (torch.as_tensor(v).clone() if copy else torch.as_tensor(v))
                         for k, v in entry.items() if v is not None}
        return out

    def step(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]:
        """Apply one update; differentiable in params, grads and state. A parameter whose
        gradient is None is left as it is, with its state, as torch.optim skips a parameter
        without `.grad` (no weight decay, no step count)."""
        if self.clip_grad is not None:
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values() if g is not None))
            factor = (self.clip_grad / (norm + 1e-6)).clamp(max=1.0)
            grads = {k: None if g is None else g * factor for k, g in grads.items()}
        update = _sgd if self.kind == "SGD" else _adam
        new_params, new_state = {}, {}
        for name, p in params.items():
            if grads.get(name) is None:
                new_params[name], new_state[name] = p, state.get(name, {})
                continue
            new_params[name], new_state[name] = update(p, grads[name], state.get(name, {}),
                                                       self.hyper[name], self.kind)
        return new_params, new_state

    def precondition(self, v: Params, state: dict) -> Params:
        """Multiply v by the diagonal ∂update/∂gradient: 1/(√v̂ + eps) for Adam(W), else 1."""
        if self.kind == "SGD":
            return v
        out = {}
        for name, t in v.items():
            entry, hyper = state.get(name, {}), self.hyper[name]
            if "exp_avg_sq" not in entry:
                out[name] = t
                continue
            correction = 1 - hyper["betas"][1] ** float(entry["step"])
            out[name] = t / ((entry["exp_avg_sq"] / correction).sqrt() + hyper["eps"])
        return out


def _snapshot_key(optimizer, named_params: Params, clip_grad) -> tuple | None:
    """What a snapshot of `optimizer` depends on, or None where a hyperparameter is a tensor."""
    groups = []
    for group in optimizer.param_groups:
        values = tuple((k, v) for k, v in group.items() if k != "params")
        if any(isinstance(v, torch.Tensor) for _, v in values):
            return None
        groups.append((values, tuple(map(id, group["params"]))))
    return type(optimizer), tuple(map(id, named_params.values())), tuple(named_params), \
        clip_grad, tuple(groups)


def _sgd(p, g, state, hyper, kind):
    if hyper.get("maximize"):
        g = -g
    if hyper["weight_decay"]:
        g = g + hyper["weight_decay"] * p
    new_state = {}
    if hyper["momentum"]:
        buffer = state.get("momentum_buffer")
        buffer = g if buffer is None else hyper["momentum"] * buffer + (1 - hyper["dampening"]) * g
        new_state["momentum_buffer"] = buffer
        g = g + hyper["momentum"] * buffer if hyper["nesterov"] else buffer
    if isinstance(hyper["lr"], float):  # torch.optim.SGD's own arithmetic: p + (−lr)·g, one op
        return torch.add(p, g, alpha=-hyper["lr"]), new_state
    return p - hyper["lr"] * g, new_state


def _adam(p, g, state, hyper, kind):
    if hyper.get("maximize"):
        g = -g
    beta1, beta2 = hyper["betas"]
    if hyper["weight_decay"]:
        if kind == "AdamW":
            p = p * (1 - hyper["lr"] * hyper["weight_decay"])
        else:
            g = g + hyper["weight_decay"] * p
    step = float(state.get("step", 0)) + 1
    exp_avg = beta1 * state.get("exp_avg", torch.zeros_like(p)) + (1 - beta1) * g
    exp_avg_sq = beta2 * state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - beta2) * g * g
    root = _safe_sqrt(exp_avg_sq / (1 - beta2 ** step))
    p = p - hyper["lr"] / (1 - beta1 ** step) * exp_avg / (root + hyper["eps"])
    return p, {"step": torch.tensor(step), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with derivative 0 (not ∞) where x = 0, e.g. for parameters whose gradient is zero."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(),
                       torch.zeros_like(x))


def sgd(named_params: Params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0) -> FunctionalOptimizer:
    """Return the functional SGD update for `named_params` (same semantics as torch.optim.SGD)."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                 weight_decay=weight_decay, maximize=False)
    return FunctionalOptimizer("SGD", {name: hyper for name in named_params})
