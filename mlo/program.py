"""`Program`: the one stateful object. It owns counters, data iterators and recorded unrolls, and
runs the schedule: every global step the lowermost levels step; an upper level steps once each level
whose solution it reads has taken `unroll` steps since its last step and is past `warmup`."""

from __future__ import annotations

import contextlib

import torch

from . import checkpoint, checks, distributed, meta, sharding
from .bypass import check_handles
from .chain import ChainRule
from .costs import Costs
from .checks import refuse_learned_hyperparameters, warn_fp16_on_cpu
from .data import Stream
from .errors import GraphError, MloError, closest, quoted
from .graph import infer
from .history import History
from .level import Level, registry
from .live import LiveUnroll, live_levels, live_uppers
from .plain import PlainStep, plain_levels
from .precision import Precision
from .running import Runner
from .task_axis import vmapped_levels
from .unroll import Window, level_device, rng_state


_ALONE = contextlib.nullcontext()  # one process: no rank to tell about a failure


class Program(Runner, ChainRule, Costs, LiveUnroll, PlainStep):
    """A multilevel program built from levels; `Program()` takes every level in `mlo.registry`.

    `on_nonfinite="raise"` (default) raises `NonFiniteError` on a NaN/inf loss or hypergradient,
    naming level, method and step; `"skip"` skips that update and counts it in `skipped`.
    At an upper level's first step, each cost on its hypergradient paths runs once more to check
    that it reads levels through their handles (`mlo.errors.HandleError` otherwise: a silent zero
    hypergradient); later steps pay nothing for it.

    Attributes:
        levels: the levels by name (`dict[str, Level]`).
        graph: the inferred `Graph` (edges, paths, execution order).
        global_step: global steps taken so far (`step()` calls, across resumes).
        steps: optimizer steps taken per level (`dict[str, int]`); an upper level steps less
            often than the levels below it.
        skipped: updates skipped per level (a non-finite value with `on_nonfinite="skip"`, or
            an fp16 overflow).
        history: per level, the logged losses and metrics of its steps (bounded, see
            `mlo.history`), and under "validate" the results of `run(validate=...)`.
        stopped_at: the global step early stopping stopped at in the last `run`, or None.
        seconds: wall time of the last `run`.

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
        self._sharded = {lv.name for lv in levels if lv.options.shard} \
            if distributed.world_size() > 1 else set()  # with one process shard=True does nothing
        for name in self._sharded:
            sharding.shard(self.levels[name])
        for lv in levels:
            lv.refresh()
        refuse_learned_hyperparameters(levels)
        self.graph = infer([lv.node for lv in levels])
        self.global_step = 0
        self.steps = {n: 0 for n in self.levels}
        self.skipped = {n: 0 for n in self.levels}
        self.history = History(self.levels)  # bounded: see mlo.history
        self._seen = {n: {low: 0 for low in self.graph.reads(n)} for n in self.levels}
        self._edges = {n: self.graph.best_response_edges(n) for n, lv in self.levels.items()
                       if lv.method is not None and (lv.method.name != "first_order"
                                                     or self.graph.starts(n))}
        self._starts = meta.check_starts(self.levels, self.graph)  # {lower: upper it starts from}
        self._learned = meta.learned_hyperparameters(self.levels, self.graph)
        for name, edges in self._edges.items():
            if not edges:
                raise GraphError(
                    f"Program: level '{name}' declares hypergrad={self.levels[name].method!r}, but "
                    f"no level whose solution it reads depends on its parameters, so its "
                    f"hypergradient would always be zero.\n  {self.levels[name].location}\n  Name "
                    f"'{name}' in the signature of the level it should steer, or use "
                    f"hypergrad='first_order' (direct gradient only).")
        meta.check_tasks(self.levels, self.graph, self._edges)
        self._meta_batches = {n: meta.MetaBatch(lv.options.tasks) for n, lv in self.levels.items()
                              if lv.options.tasks > 1 and not lv.options.vmap}
        self._precision = {n: Precision(lv.options.fp16, lv.options.bf16, _device_type(lv))
                           for n, lv in self.levels.items()}
        for name, precision in self._precision.items():
            if self.levels[name].options.fp16:
                warn_fp16_on_cpu(name, precision.device_type)
        self._unchecked = set(self._edges)  # upper levels whose paths' costs check_handles reads
        self._last_batch: dict[str, object] = {}
        self._windows: dict[tuple[str, str], Window] = {}
        for upper in self._edges:
            self._restart_windows(upper)
        self._unrolled = {lower for _, lower in self._windows}  # levels whose steps are recorded
        # itd(recompute=True) upper levels: (keep the lower levels' points on the CPU?, every k-th)
        self._keep = {upper: (lv.method.option("offload", False), lv.method.option("keep_every", 1))
                      for upper, lv in self.levels.items()
                      if lv.method is not None and lv.method.option("recompute")}
        self._streams = {n: Stream(lv.data, n) for n, lv in self.levels.items()
                         if lv.data is not None}
        self._parallel = distributed.world_size() > 1
        self._reads = {n: tuple(low for low in self.graph.reads(n) if low in self._edges.get(n, {}))
                       for n in self.levels}  # the solutions each level differentiates through
        self._live = live_levels(self)  # {level: upper} whose real steps record the ITD graph
        self._live_uppers = live_uppers(self)
        self._task_axis = vmapped_levels(self)  # {level: T} for levels run on a task axis
        self._reducers = {}  # a level without one is averaged in one all-reduce after its step
        if self._parallel:
            for lv in levels:
                if lv.name in self._sharded:  # broadcast before sharding; FSDP2 reduces it
                    self._reducers[lv.name] = None
                    continue
                distributed.broadcast_level(lv)
                self._reducers[lv.name] = distributed.GradientReducer(lv.named_parameters())
        self._plain = plain_levels(self)  # {level: its cost's handles} for plain real steps

    def __repr__(self) -> str:
        return f"<mlo Program: {', '.join(self.graph.order)} (lowest first), step {self.global_step}>"

    # -- schedule -----------------------------------------------------------------------------

    def step(self, **batches) -> dict[str, float]:
        """Perform one global step; return the losses of the levels that stepped in it.

        Only levels that stepped are keys: an upper level inside the unroll or warmup of the
        levels below it is absent (`program.due(name)` says beforehand whether a level steps;
        `program.history` keeps every level's losses). A batch passed by level name
        (`program.step(classifier=(x, y))`) replaces the batch that level would draw from its
        `data` for this step.
        """
        for name in batches:
            if name not in self.levels:
                raise GraphError(f"Program.step: got a batch for '{name}', but no level has that "
                                 f"name; levels: {quoted(self.levels)}.{closest(name, self.levels)}")
        for name in batches:
            if not self.due(name):
                raise MloError(f"Program.step (step {self.global_step}): got a batch for "
                               f"'{name}', but it does not step in this global step; pass its "
                               f"batch only when program.due('{name}') is True.")
        losses = {}
        for name in self.graph.order:
            if self._ready(name):
                guard = distributed.guard(self.global_step, name) if self._parallel else _ALONE
                try:
                    with guard:
                        loss = self._step_level(self.levels[name], batches.get(name))
                except RuntimeError as error:  # a device or dtype clash becomes a LevelError
                    checks.explain(self, name, batches.get(name), self.global_step, error)
                if loss is not None:  # None: a task of a meta-batch, not yet a step
                    losses[name] = loss
        self.global_step += 1
        return losses

    def due(self, name: str) -> bool:
        """Return whether level `name` steps in the next global step, given the steps so far.

        For an upper level this is decided before the levels below it step, so it holds when
        each level it reads has taken `unroll` steps (less the one it takes next, if it is due).
        """
        return all(self.steps[low] + self.due(low) - seen >= self.levels[low].options.unroll
                   and self.steps[low] + self.due(low) >= self.levels[low].options.warmup
                   for low, seen in self._seen[name].items())

    def _ready(self, name: str) -> bool:
        return all(self.steps[low] - seen >= self.levels[low].options.unroll
                   and self.steps[low] >= self.levels[low].options.warmup
                   for low, seen in self._seen[name].items())

    def _step_level(self, level: Level, batch) -> float | None:
        name, options = level.name, level.options
        handles = self._plain.get(name)
        if handles is not None:
            return self._plain_step(level, batch, handles)
        precision = self._precision[name]
        if name in self._unchecked:  # once: a cost that reads a module around its handle
            self._unchecked.discard(name)
            check_handles(self, name)
        if name in self._starts and self._seen[self._starts[name]][name] == self.steps[name]:
            self._reset(level)  # no step since the upper level's last: a new window starts
        if self.steps[name] < options.warmup:
            self._slide_windows(level)
        if name in self._live:
            return self._live_step(level, batch)
        rng = rng_state(level_device(level)) if name in self._unrolled else None
        meta_batch = self._meta_batches.get(name)
        if meta_batch is None or not meta_batch.done:
            _clear_grads(level)
        micro_batches, losses, finite = [], [], True
        for i in range(options.grad_accum):
            micro = batch if i == 0 and batch is not None else self._next_batch(level)
            micro_batches.append(micro)
            loss, metrics, ok = self._accumulate(level, micro, precision)
            losses.append((loss, metrics))
            finite &= ok
        self._last_batch[name] = micro_batches[-1]
        if meta_batch is not None:
            if not meta_batch.add(micro_batches, losses, finite):
                self._close_windows(name)
                return None
            micro_batches, losses, finite = meta_batch.take()
        if rng is not None:  # before the step: its hyperparameters
            self._record_windows(level, micro_batches, rng=rng)
        if finite if not self._parallel else distributed.all_ranks(finite):
            applied = self._apply(level, precision)
        else:
            self.skipped[name] += 1
            _clear_grads(level)
            applied = False
        if not applied and rng is not None:  # not taken: not part of the unrolls either
            self._drop_from_windows(name)
        return self._record(level, losses)

    def _apply(self, level: Level, precision: Precision) -> bool:
        """Step the level's optimizer on its `.grad`; return whether the step was applied (not
        where fp16 gradients overflowed: the loss scaler skips it)."""
        if self._parallel and level.name not in self._reducers:
            distributed.average_grads(level.named_parameters().values())
        precision.unscale(level.optimizer)
        if level.options.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(list(level.named_parameters().values()),
                                           level.options.clip_grad)
        applied = precision.step(level.optimizer)
        if applied and level.options.scheduler is not None:
            level.options.scheduler.step()
        return applied

    def _record(self, level: Level, losses: list) -> float:
        """Count the step, close the windows it ends and log it; return its (mean) loss."""
        name = level.name
        self.steps[name] += 1
        self._close_windows(name)
        loss = sum(l for l, _ in losses) / len(losses)
        entry = {"step": self.global_step + 1, "loss": loss}
        for _, metrics in losses[-1:]:
            entry.update(metrics)
        self.history[name].append(entry)
        return loss

    def _record_windows(self, level: Level, micro_batches: list, rule=None, rng=None) -> None:
        for (upper, lower), window in self._windows.items():
            if lower == level.name:
                offload, every = self._keep.get(upper, (None, 1))
                keep = None if offload is None else "cpu" if offload else level_device(level)
                window.record(level, micro_batches, rule, rng, keep, every,
                              self._changing_reads(upper, level))

    def _changing_reads(self, upper: str, level: Level) -> dict:
        """The parameters of the levels `level`'s cost reads, other than `upper` and the sources
        `upper` differentiates it against: they may step between this step and `upper`'s replay
        of it. (Sharded levels are left out: their values are read as they are then. A live
        level's steps record their graph, which holds the values read: nothing to keep.)"""
        if level.name in self._live:
            return {}
        fixed = {upper, *self._edges[upper][level.name]}
        return {other: self.levels[other].named_parameters() for other, _ in level.names
                if other not in fixed and other not in self._sharded}

    def _drop_from_windows(self, name: str) -> None:
        for (_, lower), window in self._windows.items():
            if lower == name:
                window.drop_last()

    def _close_windows(self, name: str) -> None:
        """Start new windows of the levels `name` reads: count their steps from here."""
        if name in self._seen and self._seen[name]:
            self._seen[name] = {low: self.steps[low] for low in self._seen[name]}
        if name in self._edges:
            self._restart_windows(name)

    def _reset(self, level: Level) -> None:
        """Start `level` from its Init level's parameters; every recorded window restarts there."""
        meta.reset(level, self.levels[self._starts[level.name]])
        for upper, lower in self._windows:
            if lower == level.name:
                self._windows[(upper, lower)] = Window.start(level)

    def _slide_windows(self, level: Level) -> None:
        """During warmup keep at most `unroll` recorded steps: no upper level can step yet, so
        older steps would only be replayed (and held in memory) at the first upper step."""
        for (upper, lower), window in self._windows.items():
            if lower == level.name and window.steps >= level.options.unroll:
                self._windows[(upper, lower)] = Window.start(level)

    def _restart_windows(self, upper: str) -> None:
        if self.levels[upper].method.name != "itd":
            return
        for lower in self._edges[upper]:
            if (upper, lower) in self._windows and self._starts.get(lower) == upper:
                continue  # it restarts at its reset, before its next step
            self._windows[(upper, lower)] = Window.start(self.levels[lower])

    # -- data and checkpoints ------------------------------------------------------------------

    def _next_batch(self, level: Level):
        if not level.uses_batch:
            return None
        if level.name not in self._streams:
            raise MloError(f"Program.step (step {self.global_step}): level '{level.name}' takes a "
                           f"batch but has no data; pass data=... to @mlo.level or a batch with "
                           f"program.step({level.name}=batch).")
        return self._streams[level.name].next(self.global_step)

    def state_dict(self) -> dict:
        """Return everything a resumed run needs: modules, optimizers, schedulers, loss scalers,
        counters (inside an unroll window too), recorded unrolls, RNG states and data positions."""
        state = checkpoint.program_state(self)
        state["meta_batches"] = {n: b.state_dict(self.levels[n])
                                 for n, b in self._meta_batches.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` into this program, built from the same levels."""
        checkpoint.load_program_state(self, state)
        meta.relink(self.levels, self._learned)
        for name, entry in state.get("meta_batches", {}).items():
            self._meta_batches[name].load_state_dict(entry, self.levels[name])

    def save(self, path) -> None:
        """Write `state_dict()` to `path` (a torch file that loads with weights_only=True)."""
        checkpoint.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, *levels: Level, **options) -> "Program":
        """Build `Program(*levels, **options)` and restore the checkpoint at `path` into it.

        The file is read with `torch.load(weights_only=True)`: a file holding any other pickled
        object is refused with a `CheckpointError`, never executed.
        """
        program = cls(*levels, **options)
        program.load_state_dict(checkpoint.load(path))
        return program


def _clear_grads(level: Level) -> None:
    """Set the level's gradients to None (what zero_grad(set_to_none=True) does, without its
    per-call profiling overhead, which shows on small levels stepped thousands of times)."""
    for p in level.named_parameters().values():
        p.grad = None


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
        if lv.name == "validate":
            raise GraphError("Program: a level is named 'validate', which program.history "
                             "reserves for validation results; give it another name with "
                             "@mlo.level(name=...).")
        names.add(lv.name)
    checks.check_shared(levels)


def _device_type(level: Level) -> str:
    for p in level.named_parameters().values():
        return p.device.type
    return "cpu"
