"""`Program.run`: the loop around `Program.step`, with progress, logging, validation, early stop,
periodic checkpoints and resume."""

from __future__ import annotations

import io
import time
import warnings

import torch

from . import loggers, progress as bars
from .errors import MloError
from .folder import Folder


class Runner:
    """The `run` loop of `Program` (kept apart from the schedule and the maths)."""

    def run(self, steps: int, *, validate=None, every: int | None = None, log=None,
            progress: bool | None = None, monitor: str | None = None, mode: str = "min",
            patience: int | None = None, checkpoint=None, checkpoint_every: int = 1000,
            keep: int = 3, resume: bool = False, restore_best: bool = False):
        """Run `steps` global steps; return `program.history` (per level, per step; bounded).

        - `validate(program)` is called every `every` global steps (and after the last step); the
          numbers it returns are kept under `history["validate"]` and logged as `validate/...`.
        - Early stopping: with `monitor="accuracy"` (a key `validate` returns), `mode` "min" or
          "max" and `patience=k`, the run stops once k validations in a row have not improved
          on the best value; `program.stopped_at` is then the global step it stopped at.
          `restore_best=True` then loads the state of the best validation (modules, optimizers,
          counters and history as they were at `program.best_step`).
        - `checkpoint="runs/exp1"`: a folder that receives a checkpoint every `checkpoint_every`
          global steps (default 1000) and at the end; the newest `keep` are kept (see
          `mlo.folder.Folder`). Each save costs one serialization and two fsyncs.
        - `resume=True`: continue from the newest checkpoint in that folder, if any, and make
          `steps` the total: the run ends at global step `steps`, however often it was
          interrupted, bit for bit as an uninterrupted run (loggers repeat the steps between
          that checkpoint and the interruption).
        - `log`: a path ending in .jsonl or .csv, or a logger (`mlo.loggers.TensorBoard()`, ...).
        - `progress`: a tqdm bar (each level's latest loss, steps per second, one line per
          validation) in terminals and notebooks, none in non-interactive logs (`mlo.progress`);
          `progress=True` forces it, `progress=False` silences it.

        Example::

            program.run(10_000, checkpoint="runs/exp1", checkpoint_every=500, resume=True)
        """
        _check_run(steps, every, monitor, mode, patience, validate, checkpoint_every, keep,
                   resume, restore_best, checkpoint)
        tracker = Tracker(monitor, mode, patience)
        folder = self._open(checkpoint, keep, resume, tracker) if checkpoint is not None else None
        end = steps if resume else self.global_step + steps
        writer, owned = loggers.resolve(log)
        bar = bars.bar(end, self.global_step, progress)
        start = time.perf_counter()
        try:
            while self.global_step < end and tracker.stopped_at is None:
                row = self._run_step(end, validate, every, tracker, bar, folder, restore_best)
                if writer is not None:
                    writer.log(row)
                if folder is not None and (self.global_step % checkpoint_every == 0
                                           or self.global_step == end or tracker.stopped_at):
                    self._save(folder, tracker, last=self.global_step == end
                               or tracker.stopped_at is not None)
        finally:
            if bar is not None:
                bar.close()
            if owned:
                writer.close()
        self.seconds = time.perf_counter() - start
        self.stopped_at, self.best_step = tracker.stopped_at, tracker.best_step
        if restore_best and tracker.best_step is not None:
            self.load_state_dict(folder.load_best() if folder is not None
                                 else torch.load(io.BytesIO(tracker.kept), weights_only=True))
        return self.history

    def _open(self, checkpoint, keep: int, resume: bool, tracker: "Tracker") -> Folder:
        """Open the checkpoint folder; with `resume`, load its newest checkpoint, if any."""
        folder = Folder(checkpoint, keep)
        if not resume and folder.steps()[-1:] > [self.global_step]:
            raise MloError(f"Program.run: the folder {folder.path} holds a checkpoint of step "
                           f"{folder.steps()[-1]}, ahead of this program (step "
                           f"{self.global_step}); pass resume=True to continue from it, or use "
                           f"another folder.")
        state = folder.latest() if resume else None
        if state is not None:
            self.load_state_dict(state)
            tracker.load_state_dict(state["run"])
        return folder

    def _save(self, folder: Folder, tracker: "Tracker", last: bool) -> None:
        """Save a periodic checkpoint; if the disk refuses it (full, say), warn and go on: the
        previous checkpoint is intact, and the next save retries. The final save must succeed."""
        try:
            folder.save(self._run_state(tracker), self.global_step)
        except OSError as error:
            if last:
                raise
            warnings.warn(f"Program.run (step {self.global_step}): could not save a checkpoint "
                          f"in {folder.path} ({error}); the run goes on, the previous checkpoint "
                          f"is intact, and the next save retries.", RuntimeWarning)

    def _run_step(self, end, validate, every, tracker, bar, folder, restore_best) -> dict:
        losses = self.step()
        row = {"step": self.global_step, **self._latest(losses)}
        if validate is not None and ((every and self.global_step % every == 0)
                                     or self.global_step == end):
            result = _numbers(validate(self) or {}, self.global_step)
            self.history.series("validate").append({"step": self.global_step, **result})
            row.update({f"validate/{k}": v for k, v in result.items()})
            if tracker.monitor is not None and tracker.update(result, self.global_step) \
                    and restore_best:
                self._keep_best(tracker, folder)
            bars.validation_line(bar, self.global_step, end,
                                 {k: v for k, v in row.items() if k.startswith("validate/")})
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.endswith("/loss")},
                            refresh=False)
        return row

    def _run_state(self, tracker: "Tracker") -> dict:
        return {**self.state_dict(), "run": tracker.state_dict()}

    def _keep_best(self, tracker: "Tracker", folder: Folder | None) -> None:
        """Keep the state of the best validation: in the folder, or serialized in memory (a
        state_dict holds references to live tensors, which later steps would change)."""
        if folder is not None:
            folder.save_best(self._run_state(tracker))
            return
        buffer = io.BytesIO()
        torch.save(self._run_state(tracker), buffer)
        tracker.kept = buffer.getvalue()

    def _latest(self, losses: dict) -> dict:
        row = {}
        for name in losses:
            entry = self.history[name][-1]
            row.update({f"{name}/{k}": v for k, v in entry.items() if k != "step"})
        return row


class Tracker:
    """Early-stopping state: the best monitored value, where it was, validations since, the stop."""

    def __init__(self, monitor: str | None, mode: str, patience: int | None):
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best = self.best_step = self.stopped_at = None
        self.stale, self.kept = 0, None

    def update(self, result: dict, step: int) -> bool:
        """Record a validation; return whether it improved on the best value."""
        if self.monitor not in result:
            raise MloError(f"Program.run: monitor='{self.monitor}', but validate returned "
                           f"{sorted(result)}; return that metric from validate or change "
                           f"monitor.")
        value = result[self.monitor]
        improved = self.best is None or (value < self.best if self.mode == "min"
                                         else value > self.best)
        if improved:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            self.stopped_at = step
        return improved

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.stale, self.stopped_at = state["stale"], state["stopped_at"]


def _numbers(result: dict, step: int) -> dict:
    if not isinstance(result, dict):
        raise MloError(f"Program.run (step {step}): validate returned {type(result).__name__}; "
                       f"return a dict of numbers such as {{'accuracy': 0.9}}.")
    out = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, (int, float)):
            raise MloError(f"Program.run (step {step}): validate returned {key}={value!r}; "
                           f"history keeps numbers only, so return a float (e.g. "
                           f"float(accuracy)).")
        out[key] = float(value)
    return out


def _check_run(steps, every, monitor, mode, patience, validate, checkpoint_every, keep, resume,
               restore_best, checkpoint) -> None:
    for key, value, minimum in (("steps", steps, 0), ("every", every, 1),
                                ("checkpoint_every", checkpoint_every, 1), ("keep", keep, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < minimum):
            kind = "non-negative" if minimum == 0 else "positive"
            raise MloError(f"Program.run: {key} must be a {kind} integer, got {value!r}.")
    if mode not in ("min", "max"):
        raise MloError(f"Program.run: mode must be 'min' or 'max', got {mode!r}.")
    if (monitor is None) != (patience is None) or (monitor is not None and validate is None):
        raise MloError("Program.run: early stopping needs validate=..., monitor='metric' and "
                       "patience=k together.")
    if restore_best and monitor is None:
        raise MloError("Program.run: restore_best=True needs early stopping (validate=..., "
                       "monitor='metric', patience=k) to know which state was best.")
    if resume and checkpoint is None:
        raise MloError("Program.run: resume=True needs checkpoint='folder' to resume from; pass "
                       "the folder the interrupted run wrote.")
