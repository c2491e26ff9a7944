"""The plain real step (a part of `Program`): a level that only follows its own gradient.

Most steps of most programs are a lower level's: thousands of them, each a cost, a gradient and
an optimizer step. When nothing else happens in such a step, mlo runs it through this one
function, with no more work than a hand-written loop: no hypergradient, window, loss scaling,
reduction or micro-batch bookkeeping to dispatch on, and the handles the cost receives built
once. The result is the same step (tested against the general path bit for bit); only the
overhead differs (about 10 µs less per step on CPU).

A level steps plainly when, for the whole run, it has no hypergradient of its own, no upper
level records its steps (an `itd` window, live or replayed) or starts it (`Init`), it uses
neither fp16 nor bf16, takes one micro-batch and one task per step, clips no gradient and runs
in one process. Anything else takes the general path (`Program._step_level`).
"""

from __future__ import annotations

import torch

from . import fast_step
from .handle import Handle
from .level import Level


def plain_levels(program) -> dict[str, dict]:
    """{level name: the keyword arguments (handles) its cost receives, batch aside} for the
    levels of `program` whose every step is plain (see the module docstring)."""
    if program._parallel:
        return {}
    plain = {}
    for name, level in program.levels.items():
        options, precision = level.options, program._precision[name]
        if (name in program._edges or name in program._unrolled or name in program._starts
                or name in program._live or name in program._meta_batches
                or precision.dtype is not None or options.grad_accum != 1
                or options.clip_grad is not None):
            continue
        handles = {"module": Handle(level)} if level.uses_module else {}
        handles.update((other, Handle(program.levels[other])) for other, _ in level.names)
        plain[name] = handles
    return plain


class PlainStep:
    """`Program._plain_step`, the real step of a plain level."""

    def _plain_step(self, level: Level, batch, handles: dict) -> float:
        """One plain step: the same as `_step_level` takes for this level, with less dispatch."""
        name = level.name
        if batch is None:
            batch = self._next_batch(level)
        own = level.named_parameters()
        for p in own.values():
            p.grad = None
        kwargs = dict(handles)
        if level.uses_batch:
            kwargs["batch"] = batch
        loss, metrics = self._loss_of(level, level.fn(**kwargs))
        value = float(loss.detach())
        self._last_batch[name] = batch
        if self._finite(level, value, "loss"):
            if loss.requires_grad:
                params = list(own.values())
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                    p.grad = g
            fast_step.step(level.optimizer)
            if level.options.scheduler is not None:
                level.options.scheduler.step()
        else:
            self.skipped[name] += 1
        return self._record(level, [(value, metrics)])
