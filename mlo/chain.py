"""The chain rule of paper eq. 2 over a program's hypergradient paths (a part of `Program`)."""

from __future__ import annotations

import contextlib

import torch

from . import distributed, sharding, shards
from .errors import GraphError, quoted
from .hypergrad._implicit import ConstantGradient
from .level import Level
from .optim import SUPPORTED, FunctionalOptimizer
from .unroll import level_device, replaying


class ChainRule:
    """Hypergradients of an upper level: chained best-response VJPs along every path, summed."""

    def _hypergradient(self, upper: str, direct: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Sum, over every path of `upper`, the chained best-response VJPs (paper eq. 2).

        Paths are accumulated as adjoints, uppermost level first, so that a level shared by
        several paths is differentiated once for all of them.
        """
        edges = self._edges[upper]
        # a sharded level's v is this rank's shard, of the ranks' mean already (mlo.shards)
        adjoint = {low: v if low in self._sharded else self._average(v)
                   for low, v in direct.items() if low in edges}
        result: dict[str, torch.Tensor] = {}
        for name in reversed(self.graph.order):
            if name not in edges or name not in adjoint:
                continue
            inputs = edges[name]
            out = self._best_response_vjp(upper, name, inputs, adjoint.pop(name))
            for source in inputs:
                # vectors that feed further VJPs are averaged over ranks here; the upper level's
                # own part is averaged by the caller, with or after its direct gradient
                part = out[source] if source == upper else self._average(out[source])
                if source in self._sharded and source != upper:  # kept as this rank's shard
                    part = shards.part(self.levels[source], part)
                target = result if source == upper else adjoint.setdefault(source, {})
                for key, t in part.items():
                    target[key] = t if key not in target else target[key] + t
        return result

    def _best_response_vjp(self, upper: str, name: str, inputs, v) -> dict[str, dict]:
        """Return (dθ*_name / dθ_source)ᵀ v for each source in `inputs`, by `upper`'s method."""
        level, method = self.levels[name], self.levels[upper].method
        window = self._windows.get((upper, name))
        if window is not None and window.live is not None:  # the real steps recorded the graph
            return {upper: self._live_vjp(window, upper, v)}
        outer = {(src, k): p.detach() for src in inputs
                 for k, p in self.levels[src].named_parameters().items()}
        lr = level.optimizer.param_groups[0]["lr"]  # a learned one is another level's tensor
        context = {"lr": lr.detach() if isinstance(lr, torch.Tensor) else lr,
                   "dtype": self._precision[name].dtype}
        if self._parallel:
            context["reduce"] = distributed.average
        start = self._starts.get(name)
        if start in inputs:  # θ₀ = φ: the window starts from the source's parameters
            context["init"] = lambda outer: {k: outer[(start, k)] for k in level.named_parameters()}
        on_shards = self._on_shards(name, method, inputs)
        if method.name == "itd":
            if not window.steps and "init" not in context:
                return {src: {} for src in inputs}
            inner = window.params
            # under data parallelism each replayed step takes the ranks' mean gradient, as the
            # real step did: the unroll of the global batch (mlo.distributed.replicated; on
            # shards, their gather's backward pass averages)
            losses = [self._closure(level, b, rng, on_shards, replicated=self._parallel,
                                    reads=reads)
                      for b, rng, reads in zip(window.batches, window.rng, window.reads)]
            context.update(optimizer=self._update_rules(name, inputs, window.optimizers),
                           state=window.state)
            if method.option("recompute"):  # the real steps' values: no forward replay
                context["trajectory"] = window.points
        else:
            inner = {k: p.detach() for k, p in level.named_parameters().items()}
            losses = self._closure(level, [self._last_batch.get(name)], on_shards=on_shards)
            if method.name == "sama" and type(level.optimizer).__name__ in SUPPORTED:
                live = level.named_parameters()
                optimizer = FunctionalOptimizer.from_optimizer(level.optimizer, live, level=name)
                context.update(optimizer=optimizer,
                               state=optimizer.state(level.optimizer, live, copy=False))
        if on_shards:  # the pass runs on this rank's shards
            inner = shards.Shards(sharding.local(inner))
            context.pop("reduce", None)  # products come back averaged over ranks
            context["dot"] = shards.dot(level)
            context.update((k, sharding.local(context[k])) for k in ("state", "trajectory")
                           if k in context)
        elif self._sharded.intersection((name, *inputs)):  # the pass runs on full parameters
            inner, outer = sharding.full(inner), sharding.full(outer)
            context.update((k, sharding.full(context[k])) for k in ("state", "trajectory")
                           if k in context)
            if name in self._sharded:
                v = shards.whole(level, v)
        try:
            with shards.regathered() if on_shards else contextlib.nullcontext():
                out = method(losses, inner, outer, v, **context)
        except ConstantGradient:
            raise GraphError(
                f"Program.step (step {self.global_step}): level '{upper}' (hypergrad="
                f"{method!r}) differentiates the solution of '{name}' by its cost's gradient, "
                f"but that gradient depends neither on '{name}''s own parameters nor on "
                f"{quoted(inputs)}: '{name}''s cost reads its parameters only through other "
                f"levels' solutions, so the hypergradient through it would be zero.\n  "
                f"{level.location}\n  Let '{name}''s cost read its own parameters (a call of "
                f"its module, or a regularizer).") from None
        return {src: {k: t for (s, k), t in out.items() if s == src} for src in inputs}

    def _on_shards(self, name: str, method, inputs) -> bool:
        """Whether the pass through sharded level `name` runs on this rank's shards
        (`mlo.shards`): not where a sharded level is differentiated against, nor for `itd` with
        a clipped update (whose norm the update rule would take over one shard)."""
        return name in self._sharded and not self._sharded.intersection(inputs) and not (
            method.name == "itd" and self.levels[name].options.clip_grad is not None)

    def _update_rules(self, name: str, inputs, optimizers: list):
        """Return the recorded update rules, or, where `name`'s optimizer hyperparameters are
        parameters of a level in `inputs` (a learned learning rate), a function of the outer
        parameters that reads them from there, so that ITD differentiates through them."""
        if name not in self._learned:
            return optimizers
        learned = {at: source for at, source in self._learned[name].items() if source[0] in inputs}
        if not learned:
            return optimizers
        return lambda outer: [o.replace({at: outer[source] for at, source in learned.items()})
                              for o in optimizers]

    def _closure(self, level: Level, batches: list, rng: dict | None = None,
                 on_shards: bool = False, replicated: bool = False, reads: dict | None = None):
        """Return f(inner, outer) = mean cost of `level` over `batches`, outer keyed (level, name);
        with `rng`, a recorded step's generator state, its random draws are the step's;
        `on_shards`: `inner` is this rank's shards of a sharded level (`mlo.shards`);
        `replicated`: the gradient to `inner` is the ranks' mean (`distributed.replicated`);
        `reads`: other levels' values, by level name, that the cost reads instead of theirs now
        (a recorded step's, `Window.record`)."""
        device = level_device(level)

        def cost(inner, outer):
            params = {level.name: shards.Shards(inner) if on_shards
                      else distributed.replicated(inner) if replicated else inner}
            params.update(reads or {})
            for (src, key), t in outer.items():
                params.setdefault(src, {})[key] = t
            with replaying(rng, device):
                return sum(self._cost(level, b, params, frozen=True)[0]
                           for b in batches) / len(batches)
        return cost

    def _average(self, params: dict) -> dict:
        return distributed.average(params) if self._parallel else params
