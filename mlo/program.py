"""`Program`: the one stateful object. It owns counters, data iterators and recorded unrolls, and
runs the schedule: every global step the lowermost levels step; an upper level steps once each level
whose solution it reads has taken `unroll` steps since its last step and is past `warmup`."""

from __future__ import annotations

import torch

from .errors import GraphError, LossError, MloError, NonFiniteError, closest, quoted
from .graph import infer
from .handle import Handle
from .hypergrad import Method
from .level import Level, registry
from .optim import SUPPORTED, FunctionalOptimizer
from .precision import Precision
from .running import Runner
from .unroll import Window


class Program(Runner):
    """A multilevel program built from levels; `Program()` takes every level in `mlo.registry`.

    `on_nonfinite="raise"` (default) raises `NonFiniteError` on a NaN/inf loss or hypergradient,
    naming level, method and step; `"skip"` skips that update and counts it in `skipped`.

    Example::

        program = mlo.Program(classifier, weighting)
        program.run(steps=1000)
        print(program.graph)
    """

    def __init__(self, *levels: Level, on_nonfinite: str = "raise"):
        levels = levels or tuple(registry.levels())
        _check_levels(levels)
        if on_nonfinite not in ("raise", "skip"):
            raise MloError(f"Program: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self.levels = {lv.name: lv for lv in levels}
        self.graph = infer([lv.node for lv in levels])
        self.global_step = 0
        self.steps = {n: 0 for n in self.levels}
        self.skipped = {n: 0 for n in self.levels}
        self.history: dict[str, list[dict]] = {n: [] for n in self.levels}
        self._seen = {n: {low: 0 for low in self.graph.reads(n)} for n in self.levels}
        self._edges = {n: self.graph.best_response_edges(n) for n, lv in self.levels.items()
                       if lv.method is not None and lv.method.name != "first_order"}
        self._precision = {n: Precision(lv.options.fp16, lv.options.bf16, _device_type(lv))
                           for n, lv in self.levels.items()}
        self._last_batch: dict[str, object] = {}
        self._windows: dict[tuple[str, str], Window] = {}
        for upper in self._edges:
            self._restart_windows(upper)
        self._init_data()

    def __repr__(self) -> str:
        return f"<mlo Program: {', '.join(self.graph.order)} (lowest first), step {self.global_step}>"

    # -- schedule -----------------------------------------------------------------------------

    def step(self, **batches) -> dict[str, float]:
        """Perform one global step; return the losses of the levels that stepped.

        A batch passed by level name (`program.step(classifier=(x, y))`) replaces the batch that
        level would draw from its `data` for this step.
        """
        for name in batches:
            if name not in self.levels:
                raise GraphError(f"Program.step: got a batch for '{name}', but no level has that "
                                 f"name; levels: {quoted(self.levels)}.{closest(name, self.levels)}")
        losses = {}
        for name in self.graph.order:
            if self._ready(name):
                losses[name] = self._step_level(self.levels[name], batches.get(name))
        self.global_step += 1
        return losses

    def _ready(self, name: str) -> bool:
        return all(self.steps[low] - seen >= self.levels[low].options.unroll
                   and self.steps[low] >= self.levels[low].options.warmup
                   for low, seen in self._seen[name].items())

    def _step_level(self, level: Level, batch) -> float:
        name, options = level.name, level.options
        precision = self._precision[name]
        level.optimizer.zero_grad(set_to_none=True)
        micro_batches, losses, finite = [], [], True
        for i in range(options.grad_accum):
            micro = batch if i == 0 and batch is not None else self._next_batch(level)
            micro_batches.append(micro)
            loss, metrics, ok = self._accumulate(level, micro, precision)
            losses.append((loss, metrics))
            finite &= ok
        self._last_batch[name] = micro_batches[-1]
        if finite:
            self._apply(level, precision)
        else:
            self.skipped[name] += 1
            level.optimizer.zero_grad(set_to_none=True)
        self._record(level, micro_batches, losses)
        return self.history[name][-1]["loss"]

    def _apply(self, level: Level, precision: Precision) -> None:
        precision.unscale(level.optimizer)
        if level.options.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(list(level.named_parameters().values()),
                                           level.options.clip_grad)
        if precision.step(level.optimizer) and level.options.scheduler is not None:
            level.options.scheduler.step()

    def _record(self, level: Level, micro_batches: list, losses: list) -> None:
        name = level.name
        self.steps[name] += 1
        for (upper, lower), window in self._windows.items():
            if lower == name:
                window.record(level, micro_batches)
        if name in self._seen and self._seen[name]:
            self._seen[name] = {low: self.steps[low] for low in self._seen[name]}
        if name in self._edges:
            self._restart_windows(name)
        entry = {"step": self.global_step, "loss": sum(l for l, _ in losses) / len(losses)}
        for _, metrics in losses[-1:]:
            entry.update(metrics)
        self.history[name].append(entry)

    def _restart_windows(self, upper: str) -> None:
        if self.levels[upper].method.name != "itd":
            return
        for lower in self._edges[upper]:
            self._windows[(upper, lower)] = Window.start(self.levels[lower])

    # -- costs and gradients ------------------------------------------------------------------

    def _cost(self, level: Level, batch, params: dict[str, dict]) -> tuple[torch.Tensor, dict]:
        """Evaluate a level's cost with `params` by level name (others: current, detached)."""
        kwargs = {}
        if level.uses_batch:
            kwargs["batch"] = batch
        if level.uses_module:
            kwargs["module"] = Handle(level, params.get(level.name))
        for other, _ in level.names:
            values = params.get(other)
            if values is None:
                values = {k: p.detach() for k, p in self.levels[other].named_parameters().items()}
            kwargs[other] = Handle(self.levels[other], values)
        with self._precision[level.name].autocast():
            out = level.fn(**kwargs)
        return self._loss_of(level, out)

    def _loss_of(self, level: Level, out) -> tuple[torch.Tensor, dict]:
        metrics = {}
        if isinstance(out, dict):
            if "loss" not in out:
                raise LossError(f"Program.step (step {self.global_step}): level '{level.name}' "
                                f"returned a dict without a 'loss' key (keys: {quoted(out)}); "
                                f"return {{'loss': scalar, ...metrics}}.")
            metrics = {k: float(v) for k, v in out.items() if k != "loss"}
            out = out["loss"]
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) \
                else type(out).__name__
            raise LossError(f"Program.step (step {self.global_step}): level '{level.name}' "
                            f"returned {got}; expected a scalar tensor loss. Reduce it, e.g. "
                            f"with .mean().")
        return out.float(), metrics

    def _accumulate(self, level: Level, batch, precision: Precision):
        """Add this micro-batch's total gradient (direct + hypergradient) into `.grad`."""
        edges = self._edges.get(level.name, {})
        reads = [low for low in self.graph.reads(level.name) if low in edges] if edges else []
        params = {low: {k: p.detach().requires_grad_()
                        for k, p in self.levels[low].named_parameters().items()} for low in reads}
        loss, metrics = self._cost(level, batch, params)
        value = float(loss.detach())
        if not self._finite(level, value, "loss"):
            return value, metrics, False
        scaled = loss * (precision.scale / level.options.grad_accum)
        own = level.named_parameters()
        inputs = list(own.values()) + [t for low in reads for t in params[low].values()]
        grads = torch.autograd.grad(scaled, inputs, allow_unused=True) if scaled.requires_grad \
            else [None] * len(inputs)
        direct_reads = _split(grads[len(own):], params, 1.0 / precision.scale)
        hyper = self._hypergradient(level.name, direct_reads) if edges else {}
        for (key, p), g in zip(own.items(), grads[:len(own)]):
            total = g if key not in hyper else (hyper[key] * precision.scale if g is None
                                               else g + hyper[key] * precision.scale)
            if total is not None:
                p.grad = total if p.grad is None else p.grad + total
        finite = all(torch.isfinite(h).all() for h in hyper.values())
        return value, metrics, self._finite(level, 0.0 if finite else float("nan"), "hypergradient")

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

    def _hypergradient(self, upper: str, direct: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Sum, over every path of `upper`, the chained best-response VJPs (paper eq. 2).

        Paths are accumulated as adjoints, uppermost level first, so that a level shared by
        several paths is differentiated once for all of them.
        """
        edges = self._edges[upper]
        adjoint = {low: v for low, v in direct.items() if low in edges}
        result: dict[str, torch.Tensor] = {}
        for name in reversed(self.graph.order):
            if name not in edges or name not in adjoint:
                continue
            inputs = edges[name]
            out = self._best_response_vjp(upper, name, inputs, adjoint.pop(name))
            for source in inputs:
                target = result if source == upper else adjoint.setdefault(source, {})
                for key, t in out[source].items():
                    target[key] = t if key not in target else target[key] + t
        return result

    def _best_response_vjp(self, upper: str, name: str, inputs, v) -> dict[str, dict]:
        """Return (dθ*_name / dθ_source)ᵀ v for each source in `inputs`, by `upper`'s method."""
        level, method = self.levels[name], self.levels[upper].method
        outer = {(src, k): p.detach() for src in inputs
                 for k, p in self.levels[src].named_parameters().items()}
        context = {"lr": level.optimizer.param_groups[0]["lr"],
                   "dtype": self._precision[name].dtype}
        if method.name == "itd":
            window = self._windows[(upper, name)]
            if not window.steps:
                return {src: {} for src in inputs}
            inner, losses = window.params, [self._closure(level, b) for b in window.batches]
            context.update(optimizer=window.optimizers, state=window.state)
        else:
            inner = {k: p.detach() for k, p in level.named_parameters().items()}
            losses = self._closure(level, [self._last_batch.get(name)])
            if method.name == "sama" and type(level.optimizer).__name__ in SUPPORTED:
                live = level.named_parameters()
                optimizer = FunctionalOptimizer.from_optimizer(level.optimizer, live, level=name)
                context.update(optimizer=optimizer,
                               state=optimizer.state(level.optimizer, live, copy=False))
        out = method(losses, inner, outer, v, **context)
        return {src: {k: t for (s, k), t in out.items() if s == src} for src in inputs}

    def _closure(self, level: Level, batches: list):
        """Return f(inner, outer) = mean cost of `level` over `batches`, outer keyed (level, name)."""
        def cost(inner, outer):
            params = {level.name: inner}
            for (src, key), t in outer.items():
                params.setdefault(src, {})[key] = t
            return sum(self._cost(level, b, params)[0] for b in batches) / len(batches)
        return cost

    # -- data -----------------------------------------------------------------------------------

    def _init_data(self) -> None:
        self._iterators = {n: None for n in self.levels}
        self.data_positions = {n: [0, 0] for n in self.levels}  # [epoch, batches drawn in it]

    def _next_batch(self, level: Level):
        if not level.uses_batch:
            return None
        if level.data is None:
            raise MloError(f"Program.step (step {self.global_step}): level '{level.name}' takes a "
                           f"batch but has no data; pass data=... to @mlo.level or a batch with "
                           f"program.step({level.name}=batch).")
        position = self.data_positions[level.name]
        for _ in range(2):
            if self._iterators[level.name] is None:
                self._iterators[level.name] = iter(level.data)
            try:
                batch = next(self._iterators[level.name])
                position[1] += 1
                return batch
            except StopIteration:
                self._iterators[level.name] = None
                position[0], position[1] = position[0] + 1, 0
        raise MloError(f"Program.step (step {self.global_step}): level '{level.name}': its data "
                       f"yielded no batch after a restart; pass a re-iterable (a list or a "
                       f"DataLoader), not a one-shot iterator or an empty dataset.")


def _split(grads, params: dict[str, dict], factor: float) -> dict[str, dict]:
    out, i = {}, 0
    for low, values in params.items():
        out[low] = {}
        for key, t in values.items():
            g = grads[i]
            out[low][key] = torch.zeros_like(t) if g is None else g * factor
            i += 1
    return out


def _check_levels(levels) -> None:
    if not levels:
        raise GraphError("Program: no levels; pass them, Program(inner, outer), or define them "
                         "with @mlo.level first.")
    names = set()
    for lv in levels:
        if not isinstance(lv, Level):
            raise GraphError(f"Program: expected levels made with @mlo.level, got "
                             f"{type(lv).__name__}; decorate the function with @mlo.level(...).")
        if lv.name in names:
            raise GraphError(f"Program: two levels are named '{lv.name}'; give one another name "
                             f"with @mlo.level(name=...).")
        names.add(lv.name)


def _device_type(level: Level) -> str:
    for p in level.named_parameters().values():
        return p.device.type
    return "cpu"
