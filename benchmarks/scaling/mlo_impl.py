"""Single hypergradients through mlo's functional core: `mlo.hypergrad.<method>(...)(loss_fn,
inner_params, outer_params, v, lr=...)`, no Program."""

from __future__ import annotations

import mlo

from ..mlo_methods import method as build
from .common import Problem, inner_cost

UNSUPPORTED = {"explicit": "only the explicit implementation builds matrices"}


def hypergradient(method: str, p: Problem):
    if method == "itd":
        fn = mlo.hypergrad.itd(steps=p.steps)
    else:
        fn = build(method, p.iters, p.r, p.lr)

    def loss_fn(inner, outer):
        return inner_cost(inner["w"], outer["lam"], p.x, p.y)

    return lambda: fn(loss_fn, {"w": p.w}, {"lam": p.lam}, {"w": p.v}, lr=p.lr)["lam"]
