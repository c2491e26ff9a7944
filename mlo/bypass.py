"""Catch a cost that bypasses its handles: the silent zero hypergradient of `net(x)` in a cost.

In a real step a level's module runs live, so a cost that calls the network object (`net(x)`)
instead of its handle (`module(x)`) trains as usual; only the hypergradient passes, which run the
cost on the parameters mlo passes in, see the difference: none of those parameters reaches the
cost, and the hypergradient through that level is exactly zero. `check_handles` runs each cost on
an upper level's paths once, at that level's first step, and raises when a level's passed
parameters reach nothing while its live ones reach the loss.
"""

from __future__ import annotations

import torch

from . import sharding
from .errors import HandleError


def check_handles(program, upper: str) -> None:
    """Raise a `HandleError` if a cost on `upper`'s paths reads a level's module directly.

    For each level X differentiated on those paths, evaluate X's cost once with fresh copies of
    the parameters mlo passes (X's own and each level X is differentiated against): a level none
    of whose copies reach the loss, while its live parameters do, is read around its handle. A
    cost that legitimately ignores some parameters (a frozen branch) still reaches others, and a
    cost that reads a level not at all reaches neither: neither raises. Cost: one forward and one
    backward pass of each such cost, once per upper level.
    """
    for name, sources in program._edges[upper].items():
        level = program.levels[name]
        if level.uses_batch and name not in program._last_batch:
            continue  # not stepped in this process yet (a resumed run): no batch to check on
        involved = (name, *sources)
        live = {n: program.levels[n].named_parameters() for n in involved}
        passed = {n: _leaves(program, n, live[n]) for n in involved}
        # the check must not shift the random stream (dropout) that the run goes on to draw from
        devices = sorted({p.device.index or 0 for group in live.values() for p in group.values()
                          if p.device.type == "cuda"})
        # a sharded module never enters the graph of its live (sharded) parameters: a call of it
        # in this functional pass is what reads it around its handle
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                sharding.calls(program.levels[n] for n in involved) as called:
            loss, _ = program._cost(level, program._last_batch.get(name), passed, frozen=True)
            inputs = [t for n in involved for group in (passed[n], live[n]) for t in group.values()]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad \
                else [None] * len(inputs)
        reached = iter(g is not None for g in grads)
        for n in involved:
            via_handle = any([next(reached) for _ in passed[n]])
            around = any([next(reached) for _ in live[n]]) or n in called
            if around and not via_handle:
                raise HandleError(_message(program, upper, level, n))


def _leaves(program, name: str, live: dict) -> dict:
    """Fresh leaves for the parameters mlo passes to `name`'s cost (a sharded level's shards)."""
    if name in program._sharded:
        return sharding.leaves(program.levels[name])
    return {k: p.detach().requires_grad_() for k, p in live.items()}


def _message(program, upper: str, level, other: str) -> str:
    prefix = f"Program.step (step {program.global_step}): level '{level.name}'"
    through = f"so the hypergradient of level '{upper}' through '{level.name}' would be exactly zero"
    tensor = isinstance(program.levels[other].module, torch.Tensor)
    what, args = ("its tensor", "()") if tensor else ("its network", "(x)")
    if other == level.name:
        example = "" if tensor else " (e.g. net(x))"
        return (f"{prefix} reads {what} directly{example} instead of through its 'module' "
                f"argument: the parameters mlo passes to 'module' do not reach its loss, {through}."
                f"\n  {level.location}\n  Use module{args} in the cost, not the object itself.")
    return (f"{prefix} names '{other}' but reads {what} directly instead of through the handle "
            f"'{other}': the parameters mlo passes through that handle do not reach its loss, "
            f"{through}.\n  {level.location}\n  Use the handle in the cost: {other}{args}.")
