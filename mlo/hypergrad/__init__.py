"""Hypergradient methods: each factory returns a `Method`, a pure best-response VJP.

`method(loss_fn, inner_params, outer_params, v, **context) -> dict` computes (d inner*/d outer)ᵀ v
for the inner cost `loss_fn(inner_params, outer_params)`, with no `Program` needed. In
`@mlo.level(hypergrad=...)` a string is shorthand for the factory with its defaults.
"""

from __future__ import annotations

import torch

from ..errors import LevelError, closest
from ._implicit import gradients
from ._method import Method
from .aid import aid_cg, aid_neumann
from .fd import aid_fd, sama
from .itd import itd


def first_order() -> Method:
    """Ignore the dependence of lower solutions on this level: (dθ*/dφ)ᵀ v = 0 (DARTS first order).

    The level then steps on its direct gradient alone. Where a lower level starts from this
    level's parameters (`mlo.Init`, context `init`), the start is kept with the unrolled steps'
    Jacobian taken as the identity, (dθ_T/dφ)ᵀ v = (dθ_0/dφ)ᵀ v = v: first-order MAML. Cost:
    nothing beyond the direct gradient.

    >>> import torch
    >>> first_order()(None, {}, {"lam": torch.ones(2)}, {})["lam"]
    tensor([0., 0.])
    >>> first_order()(None, {}, {"lam": torch.ones(2)}, {"w": torch.full((2,), 3.0)},
    ...               init=lambda outer: {"w": outer["lam"]})["lam"]
    tensor([3., 3.])
    """
    def method(loss_fn, inner_params, outer_params, v, *, init=None, **context):
        if init is None:
            return {k: torch.zeros_like(t) for k, t in outer_params.items()}
        with torch.enable_grad():
            outer = {k: t.detach().requires_grad_() for k, t in outer_params.items()}
            start = init(outer)
            return gradients({k: t.view_as(t) for k, t in start.items()}, outer, v)

    return Method("first_order", method)


METHODS = {"itd": itd, "aid_cg": aid_cg, "aid_neumann": aid_neumann, "aid_fd": aid_fd,
           "sama": sama, "first_order": first_order}


def resolve(hypergrad, level: str) -> Method | None:
    """Turn `@level(hypergrad=...)` into a `Method` (or None), or raise a `LevelError`."""
    if hypergrad is None or isinstance(hypergrad, Method):
        return hypergrad
    if isinstance(hypergrad, str) and hypergrad in METHODS:
        return METHODS[hypergrad]()
    if isinstance(hypergrad, str):
        raise LevelError(f"@level '{level}': unknown hypergrad '{hypergrad}'; valid: "
                         f"{', '.join(METHODS)}.{closest(hypergrad, METHODS)}")
    raise LevelError(f"@level '{level}': hypergrad must be a method name ({', '.join(METHODS)}), "
                     f"a factory result such as mlo.hypergrad.aid_cg(iters=20), or None; got "
                     f"{type(hypergrad).__name__}.")


__all__ = ["Method", "itd", "aid_cg", "aid_neumann", "aid_fd", "sama", "first_order", "resolve"]
