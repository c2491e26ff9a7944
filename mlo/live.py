"""Live unrolls: ITD windows differentiated through the real steps, without a replay (a part of
`Program`).

A lower level read by an ITD upper level takes each real step on a differentiable copy of its
parameters: the gradient ∇_θ f(θ_t, φ) is taken with `create_graph=True`, the level's own torch
optimizer applies it (detached) to the module, as in any real step, and the functional mirror of
that optimizer extends the graph, θ_{t+1}(φ) = update(θ_t, ∇_θ f). The graph's values are then
set to the module's (θ_{t+1} = θ − θ.detach() + module value: exactly the module's value, with
θ's derivatives; skipped for plain SGD on CPU, whose mirror is the optimizer's own arithmetic),
so the torch optimizer stays authoritative: the module's values, `.grad` and optimizer state are exactly those of a level
without ITD, and the graph is evaluated at them. The window starts from the module's parameters
at the upper level's last step (θ₀ = φ for a level that starts from it by `mlo.Init`: MAML).
The upper level's hypergradient is then one backward pass, (dθ_T/dφ)ᵀ v, where a replay would
first take the T steps again: same costs, same update rule, same order, so the same result to
rounding. An upper level whose every read solution is such a window evaluates its cost on the
trajectories θ_T(φ) themselves, so one backward pass gives its whole gradient, as a hand-written
unroll does.

Cost: each real step builds its double-backward graph (what the replay would build), and the
graph of the T steps is held from a window's first step until the upper level's step (a replay
holds it only during that step); the peak, at the upper level's step, is the same. The graph
holds what the second backward pass reads (activations, and parameters only where the backward
pass reads them), not a copy of θ_t per step, and the upper level's backward pass frees it as it
goes unless another micro-batch or upper level needs it again.

Used only where nothing else needs the real step: one micro-batch per step, no fp16/bf16, no
data parallelism, no activation checkpointing (a memory option: live windows hold their graph
longer), a level that has no hypergradient of its own (see `live_levels` for several
ITD upper levels); elsewhere the window is replayed. A window resumed from a checkpoint takes its
recorded steps again functionally, moved onto the values the real steps had, then continues live.
For plain SGD on CPU (and on a task axis, where the mirror is the update) the replay takes those
very values bit for bit, so nothing is kept for it; for any other update the window keeps the
parameters after each of its steps (one copy of θ per step, the price of exact resume there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fast_step
from .costs import all_finite, add_to_grads, scaled_loss
from .optim import FunctionalOptimizer
from .task_axis import broadcast, task_costs
from .unroll import level_device, replaying, rng_state


@dataclass
class Trajectory:
    """The differentiable parameters and optimizer state of a live window at its current step."""

    params: dict
    state: dict


def live_levels(program) -> dict[str, tuple[str, ...]]:
    """Return {level: its ITD upper levels} for the levels whose real steps record their window.

    A level qualifies when each of those upper levels differentiates it against its own
    parameters only; where there are several (Meta-SGD's meta level and learned rates), each
    reads that level alone, so their windows open and close together and share one trajectory.
    """
    windows: dict[str, list[str]] = {}
    for upper, edges in program._edges.items():
        method = program.levels[upper].method
        if method.name == "itd" and not method.option("recompute"):
            for lower in edges:
                windows.setdefault(lower, []).append(upper)
    live = {}
    for lower, uppers in windows.items():
        options = program.levels[lower].options
        alone = len(uppers) == 1 or all(program.graph.reads(u) == (lower,) for u in uppers)
        orders = {program.levels[u].method.option("first_order") for u in uppers}
        if (alone and len(orders) == 1
                and all(program._edges[u][lower] == (u,) for u in uppers)
                and lower not in program._edges and options.grad_accum == options.tasks == 1
                and not options.activation_checkpointing
                and not (options.fp16 or options.bf16) and not program._parallel):
            live[lower] = tuple(uppers)
    return live


def live_uppers(program) -> set[str]:
    """Return the upper levels whose every read solution is a live window of their own."""
    return {upper for uppers in program._live.values() for upper in uppers
            if program._edges[upper] == {low: (upper,) for low in program._reads[upper]}
            and all(upper in program._live.get(low, ()) for low in program._reads[upper])}


class LiveUnroll:
    """The live real step and its hypergradient (mixed into `Program`)."""

    def _reads_live(self, name: str) -> bool:
        return all(self._windows[(name, low)].live is not None for low in self._reads[name])

    def _live_accumulate(self, level, batch, precision):
        """`_accumulate` for a level in `live_uppers`: its cost reads the live trajectories
        θ_T(φ), so one backward pass gives its direct gradient and hypergradient together, as a
        hand-written MAML loop computes them."""
        name = level.name
        ends = {low: self._windows[(name, low)].live.params for low in self._reads[name]}
        if level.options.vmap:  # the mean of the tasks' losses, each on its own ends
            losses, metrics = task_costs(self, level, batch, ends, level.options.tasks)
            loss = losses.mean()
        else:
            loss, metrics = self._cost(level, batch, ends, real=True)
        value = float(loss.detach())
        if not self._finite(level, value, "loss"):
            return value, metrics, False
        scaled = scaled_loss(level, precision, loss)
        own = level.named_parameters()
        # the graph is freed as the pass goes (its peak is then the graph, not graph and
        # gradients), unless several micro-batches or another upper level still need it
        retain = level.options.grad_accum > 1 or any(len(self._live[low]) > 1
                                                     for low in self._reads[name])
        grads = torch.autograd.grad(scaled, list(own.values()), retain_graph=retain,
                                    allow_unused=True)
        add_to_grads(own.values(), grads)  # an fp16 overflow stays there, for the loss scaler
        # in a meta-batch the tasks' gradients add up in .grad, where a NaN or inf stays: one
        # check of the sum, after the last task, decides as a check of every task would
        meta_batch = self._meta_batches.get(name)
        finite = precision.scaler is not None or (
            meta_batch is not None and meta_batch.done < meta_batch.tasks - 1) or all_finite(
            {name: {k: p.grad for k, p in own.items() if p.grad is not None}})
        return value, metrics, self._finite(level, 0.0 if finite else float("nan"),
                                            "hypergradient")

    def _live_step(self, level, batch) -> float:
        """Take `level`'s real step on its live window; return its loss.

        The gradient is taken with the graph; the level's optimizer applies it detached and the
        trajectory is moved to the module's new values. A window without a trajectory starts one;
        one resumed from a checkpoint mid-window first takes its recorded steps again, giving the
        trajectory the uninterrupted run had.
        """
        name = level.name
        windows = [self._windows[(upper, name)] for upper in self._live[name]]
        if any(window.live is None for window in windows):
            start = self._start_trajectory(level, windows[0])
            for window in windows:
                window.live = start
            recorded = windows[0]
            for step, (batches, rule) in enumerate(zip(recorded.batches, recorded.optimizers)):
                with replaying(recorded.rng[step], level_device(level)):
                    self._advance(level, windows, batches[0], rule, real=False)
                if step < len(recorded.values) and recorded.values[step] is not None:
                    _take_values(recorded.live, recorded.values[step])  # the real step's values
        micro = batch if batch is not None else self._next_batch(level)
        self._last_batch[name] = micro
        rule = FunctionalOptimizer.from_optimizer(level.optimizer, level.named_parameters(),
                                                  level.options.clip_grad, name)
        self._record_windows(level, [micro], rule, rng_state(level_device(level)))
        value, metrics, grads = self._advance(level, windows, micro, rule)
        # the values to resume this step with: None where a replay takes the very same ones
        values = None
        if grads is None:  # skipped, as a real step would be: the trajectory stays where it is
            self.skipped[name] += 1
            for p in level.named_parameters().values():
                p.grad = None
            self._drop_from_windows(name)
            return self._record(level, [(value, metrics)])
        if name not in self._task_axis:  # (on a task axis the mirror is the update)
            clipped = level.options.clip_grad is not None  # clipping scales .grad in place
            for key, p in level.named_parameters().items():
                g = grads[key]
                p.grad = None if g is None else g.detach().clone() if clipped else g.detach()
            self._apply(level, self._precision[name])
            if clipped or not fast_step.plain_cpu_sgd(level.optimizer):
                values = _take_values(windows[0].live, level.named_parameters())
            # else the mirror's update is the optimizer's own arithmetic: the values are equal
        for window in windows:
            window.values.append(values)
        return self._record(level, [(value, metrics)])

    def _advance(self, level, windows: list, batch, rule: FunctionalOptimizer, real=True):
        """Take one differentiable step of the trajectory; return (loss, metrics, gradients),
        gradients None where the loss is not finite (and the step not taken). `real=False` for a
        step taken again (a resumed window): running statistics do not advance twice."""
        uppers = self._live[level.name]
        # with several upper levels, one steps its parameters in place before the next one
        # differentiates: the graph reads copies of them
        copy = len(uppers) > 1
        theta = windows[0].live.params
        inputs = self._live_inputs(level, uppers, theta, copy)
        if level.name in self._task_axis:  # the sum: each task's parameters get their gradient
            losses, metrics = task_costs(self, level, batch, inputs,
                                         self._task_axis[level.name], real)
            loss, value = losses.sum(), float(losses.detach().mean())
        else:
            loss, metrics = self._cost(level, batch, inputs, real=real)
            value = float(loss.detach())
        if not self._finite(level, value, "loss"):
            return value, metrics, None
        second_order = not self.levels[uppers[0]].method.option("first_order")
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()),
                                                    create_graph=second_order, allow_unused=True)))
        # a parameter the loss does not reach keeps its gradient None: no update, as in torch
        rules = self._update_rules(level.name, uppers, [rule])
        rule = (rules(self._live_sources(uppers, copy)) if callable(rules) else rules)[0]
        trajectory = Trajectory(*rule.step(theta, grads, windows[0].live.state))
        for window in windows:
            window.live = trajectory
        return value, metrics, grads

    def _start_trajectory(self, level, window) -> Trajectory:
        """θ₀: the window's recorded start, or a copy of φ for a level that starts from one of
        its ITD upper levels (φ steps in place while the graph may still be needed)."""
        start = self._starts.get(level.name)
        if start in self._live[level.name]:
            params = {k: t.clone() for k, t in self.levels[start].named_parameters().items()}
            if level.name in self._task_axis:
                params = broadcast(params, self._task_axis[level.name])
        else:
            params = {k: t.detach().requires_grad_() for k, t in window.params.items()}
        return Trajectory(params, {k: dict(v) for k, v in window.state.items()})

    def _live_sources(self, uppers, copy: bool) -> dict:
        """The upper levels' parameters, keyed (level, name) as outer parameters are."""
        return {(upper, k): p.clone() if copy else p for upper in uppers
                for k, p in self.levels[upper].named_parameters().items()}

    def _live_inputs(self, level, uppers, theta: dict, copy: bool) -> dict:
        """Parameters for `level`'s cost: θ_t, the upper levels live (or copies), every other
        level frozen (a level that steps in place during the window must not be in the graph)."""
        params = {level.name: theta}
        for upper in uppers:
            params[upper] = {k: p.clone() if copy else p
                             for k, p in self.levels[upper].named_parameters().items()}
        for other, _ in level.names:
            if other not in params:
                params[other] = {k: p.detach()
                                 for k, p in self.levels[other].named_parameters().items()}
        return params

    def _live_vjp(self, window, upper: str, v: dict) -> dict:
        """(dθ_T/dφ)ᵀ v through the recorded graph of a live window."""
        sources = self.levels[upper].named_parameters()
        ends = [(t, v[k]) for k, t in window.live.params.items() if t.requires_grad]
        if not ends:
            return {k: torch.zeros_like(p) for k, p in sources.items()}
        # retained: with grad_accum the upper level asks once per micro-batch; the graph goes
        # with the window when the upper level steps
        grads = torch.autograd.grad([t for t, _ in ends], list(sources.values()),
                                    [w for _, w in ends], retain_graph=True, allow_unused=True)
        return {k: torch.zeros_like(p) if g is None else g
                for (k, p), g in zip(sources.items(), grads)}


def _take_values(trajectory: Trajectory, source: dict) -> dict:
    """Give the trajectory the values of `source` (the module after the real step, or those
    recorded of it), keeping its graph: θ − θ.detach() + value is exactly the value, with θ's
    derivatives. The torch optimizer's arithmetic (fused kernels, its own order of operations)
    is authoritative, the mirror's graph gives the derivatives. Returns the values, detached
    views of the new trajectory (what a window keeps to resume with)."""
    trajectory.params.update((k, (t - t.detach()).add_(source[k].detach()))
                             for k, t in trajectory.params.items())
    return {k: t.detach() for k, t in trajectory.params.items()}
