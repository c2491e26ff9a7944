"""`Method`: a configured hypergradient method, callable as a pure function over parameter dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A best-response vector-Jacobian product `v ↦ (d inner*/d outer)ᵀ v`.

    Call it as `method(loss_fn, inner_params, outer_params, v, **context) -> dict` keyed like
    `outer_params`, where `loss_fn(inner_params, outer_params)` is the inner cost. The keyword
    context is what a `Program` knows of the inner level and passes to every method, each using
    what it needs: `lr` (inner learning rate), `optimizer` (a `mlo.optim.FunctionalOptimizer`),
    `state` (that optimizer's state at `inner_params`), `dtype` (the inner cost's autocast
    dtype, or None), under data parallelism `reduce` (the mean over ranks of a dict), and on a
    sharded inner level (`mlo.shards`: `inner_params`, `v` and the method's vectors are this
    rank's shards, products come back averaged over ranks, so there is no `reduce`) `dot` (the
    inner product of two such dicts, the ranks' parts added).
    """

    name: str
    fn: Callable = field(repr=False, compare=False)
    options: tuple = ()

    def option(self, key: str, default=None):
        """The value of one of the options this method was configured with (`default` if unset)."""
        return dict(self.options).get(key, default)

    def __call__(self, loss_fn, inner_params: Params, outer_params: Params, v: Params,
                 **context) -> Params:
        return self.fn(loss_fn, inner_params, outer_params, v, **context)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options)})"
