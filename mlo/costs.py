"""Costs and gradients of a level's real step (a part of `Program`): evaluating a cost with given
parameters, splitting its output into loss and metrics, and accumulating the total gradient."""

from __future__ import annotations

import torch

from . import distributed, sharding, shards
from .errors import LossError, NonFiniteError, quoted
from .handle import Handle
from .level import Level
from .precision import Precision


class Costs:
    """Evaluate levels' costs and accumulate their gradients (direct + hypergradient) in `.grad`."""

    def _cost(self, level: Level, batch, params: dict[str, dict], frozen: bool = False,
              real: bool = False) -> tuple[torch.Tensor, dict]:
        """Evaluate a level's cost with `params` by level name; other levels run live.

        A live level runs its module directly (no functional call): its parameters may enter the
        autograd graph, but gradients are only ever taken with respect to explicit inputs, so
        they never receive any; this is cheaper than rebinding detached copies on every call.
        With `frozen=True` (hypergradient passes) the other levels run on detached parameters,
        so those auxiliary passes record no graph for parameters nobody differentiates. `real`
        marks a real step run with given parameters (a live ITD window): modules then advance
        their running statistics, as in any real step.
        """
        out = self._cost_output(level, batch, params, frozen, real)
        return self._loss_of(level, out, metrics=not frozen)

    def _cost_output(self, level: Level, batch, params: dict[str, dict], frozen: bool = False,
                     real: bool = False):
        """What the cost function returns (a loss, or a dict with one), as `_cost` runs it."""
        kwargs = {}
        if level.uses_batch:
            kwargs["batch"] = batch
        if level.uses_module:
            kwargs["module"] = Handle(level, params.get(level.name), real=real)
        for other, _ in level.names:
            values = params.get(other)
            if values is None and frozen:
                values = {k: p.detach() for k, p in self.levels[other].named_parameters().items()}
                if other in self._sharded:
                    values = shards.Shards(sharding.local(values))
            kwargs[other] = Handle(self.levels[other], values, real=real)
        with self._precision[level.name].autocast():
            return level.fn(**kwargs)

    def _loss_of(self, level: Level, out, metrics: bool = True) -> tuple[torch.Tensor, dict]:
        """Split a cost's output into the scalar loss and its metrics (read only when `metrics`:
        hypergradient passes may run under torch.func transforms, where values cannot be read)."""
        values = {}
        if isinstance(out, dict):
            if "loss" not in out:
                raise LossError(f"Program.step (step {self.global_step}): level '{level.name}' "
                                f"returned a dict without a 'loss' key (keys: {quoted(out)}); "
                                f"return {{'loss': scalar, ...metrics}}.")
            if metrics:
                values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                          for k, v in out.items() if k != "loss"}
            out = out["loss"]
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) \
                else type(out).__name__
            raise LossError(f"Program.step (step {self.global_step}): level '{level.name}' "
                            f"returned {got}; expected a scalar tensor loss. Reduce it, e.g. "
                            f"with .mean().")
        return out.float(), values

    def _accumulate(self, level: Level, batch, precision: Precision):
        """Add this micro-batch's total gradient (direct + hypergradient) into `.grad`.

        On an fp16 level an overflow anywhere in it (the scaled gradient passed to the levels
        below, or the hypergradient that comes back) is left in `.grad`, where the loss scaler
        finds it: the step is skipped, counted and the scale lowered, as for any fp16 overflow.
        """
        if level.name in self._live_uppers and self._reads_live(level.name):
            return self._live_accumulate(level, batch, precision)
        edges = self._edges.get(level.name, {})
        reducer = self._reducers.get(level.name)
        if not edges and reducer is None and precision.scaler is None:
            return self._accumulate_own(level, batch, precision)
        reads = self._reads[level.name]
        # a sharded level read here runs on its shards: the gradient to them is v's shard
        leaves = {low: sharding.leaves(self.levels[low]) for low in reads if low in self._sharded}
        params = {low: leaves.get(low) or self.levels[low].named_parameters() for low in reads}
        if leaves:  # the sharded module itself would give no gradient to `leaves`
            with sharding.calls(self.levels[low] for low in leaves) as called:
                loss, metrics = self._cost(level, batch, leaves, real=True)
            sharding.refuse(called, self.global_step, level)
        else:
            loss, metrics = self._cost(level, batch, {})
        value = float(loss.detach())
        finite = self._finite(level, value, "loss")
        if self._parallel:  # agree before the hypergradient's collectives, which all must join
            finite = distributed.all_ranks(finite)
        if not finite:
            return value, metrics, False
        scaled = scaled_loss(level, precision, loss)
        own = level.named_parameters()
        inputs = list(own.values()) + [t for low in reads for t in params[low].values()]
        if reducer is not None:  # own gradients are averaged over ranks during the backward pass
            reducer.arm()
        grads = torch.autograd.grad(scaled, inputs, allow_unused=True) if scaled.requires_grad \
            else [None] * len(inputs)
        if reducer is not None:
            grads = reducer.reduced(grads[:len(own)]) + list(grads[len(own):])
        direct_reads = _split(grads[len(own):], params, 1.0 / precision.scale) if reads else {}
        # free what the graph of this pass holds before the hypergradient's passes
        params = leaves = inputs = loss = scaled = None
        overflow = precision.scaler is not None and not all_finite(direct_reads)
        hyper = self._hypergradient(level.name, direct_reads) if edges and not overflow else {}
        if hyper and reducer is not None:  # the reducer's hooks never see a hypergradient
            hyper = self._average(hyper)
        finite = all_finite({level.name: hyper})
        if precision.scaler is not None and not (finite and not overflow):
            hyper = {k: torch.full_like(p, float("inf")) for k, p in own.items()}
            finite = True
        totals = [g if key not in hyper else hyper[key] * precision.scale if g is None
                  else g + hyper[key] * precision.scale
                  for key, g in zip(own, grads[:len(own)])]
        add_to_grads(own.values(), totals)
        return value, metrics, self._finite(level, 0.0 if finite else float("nan"), "hypergradient")

    def _accumulate_own(self, level: Level, batch, precision: Precision):
        """`_accumulate` for a level without hypergradient, loss scaling or reducer: its own
        gradient only (the common lower level, stepped thousands of times: no more work than a
        hand-written step)."""
        loss, metrics = self._cost(level, batch, {})
        value = float(loss.detach())
        finite = self._finite(level, value, "loss")
        if self._parallel:  # a sharded level: every rank must join FSDP2's backward collectives
            finite = distributed.all_ranks(finite)
        if not finite:
            return value, metrics, False
        if loss.requires_grad and level.name in self._sharded:  # FSDP2 reduce-scatters it
            others = [p for other, _ in level.names
                      for p in self.levels[other].named_parameters().values()]
            sharding.backward(scaled_loss(level, precision, loss), others)
        elif loss.requires_grad:
            own = level.named_parameters().values()
            add_to_grads(own, torch.autograd.grad(scaled_loss(level, precision, loss), list(own),
                                                  allow_unused=True))
        return value, metrics, True

    def _finite(self, level: Level, value: float, what: str) -> bool:
        if value == value and abs(value) != float("inf"):
            return True
        if self.on_nonfinite == "skip":
            return False
        method = f" (hypergrad={level.method!r})" if level.method else ""
        raise NonFiniteError(
            f"Program.step (step {self.global_step}): level '{level.name}'{method} has a "
            f"non-finite {what} ({value}). Lower its learning rate, clip gradients "
            f"(clip_grad=...), or build the Program with on_nonfinite='skip' to skip such updates.")


def scaled_loss(level: Level, precision: Precision, loss: torch.Tensor) -> torch.Tensor:
    """The loss to differentiate: scaled for fp16, divided over the micro-batches (and tasks,
    unless they run side by side: `vmap=True`) whose gradients one optimizer step accumulates."""
    tasks = 1 if level.options.vmap else level.options.tasks
    scaled, parts = precision.scale_loss(loss), level.options.grad_accum * tasks
    return scaled / parts if parts > 1 else scaled


def add_to_grads(params, grads) -> None:
    """Accumulate `grads` into the parameters' `.grad` (a None gradient adds nothing)."""
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _split(grads, params: dict[str, dict], factor: float) -> dict[str, dict]:
    out, i = {}, 0
    for low, values in params.items():
        out[low] = {}
        for key, t in values.items():
            g = grads[i]
            out[low][key] = torch.zeros_like(t) if g is None else g if factor == 1.0 else g * factor
            i += 1
    return out


def all_finite(tensors: dict[str, dict]) -> bool:
    """Whether every tensor of a {level: {name: tensor}} dict is finite (one host read)."""
    flags = [torch.isfinite(t).all() for values in tensors.values() for t in values.values()]
    return not flags or bool(torch.stack(flags).all())
