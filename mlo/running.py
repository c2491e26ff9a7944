"""`Program.run`: the loop around `Program.step`, with progress, logging, validation, early stop."""

from __future__ import annotations

import sys
import time

from . import loggers
from .errors import MloError


class Runner:
    """The `run` loop of `Program` (kept apart from the schedule and the maths)."""

    def run(self, steps: int, *, validate=None, every: int | None = None, log=None,
            progress: bool | None = None, monitor: str | None = None, mode: str = "min",
            patience: int | None = None) -> dict[str, list[dict]]:
        """Run `steps` global steps; return the metrics history (per level, per step).

        - `validate(program)` is called every `every` steps (and after the last step); the dict
          of metrics it returns is kept under `history["validate"]` and logged as `validate/...`.
        - Early stopping: with `monitor="accuracy"` (a key `validate` returns), `mode` "min" or
          "max" and `patience=k`, the run stops once k validations in a row have not improved
          on the best value; `program.stopped_at` is then the global step it stopped at.
        - `log`: a path ending in .jsonl or .csv, or a logger (`mlo.loggers.TensorBoard()`, ...).
        - A tqdm progress bar shows each level's latest loss and the steps per second when
          attached to a terminal; `progress=False` silences it, `progress=True` forces it.
        """
        _check_run(steps, every, monitor, mode, patience, validate)
        writer, owned = loggers.resolve(log)
        bar = _bar(steps, progress)
        best, stale, self.stopped_at = None, 0, None
        start = time.perf_counter()
        try:
            for i in range(steps):
                losses = self.step()
                row = {"step": self.global_step, **self._latest(losses)}
                if validate is not None and ((every and (i + 1) % every == 0) or i + 1 == steps):
                    result = validate(self) or {}
                    self.history.series("validate").append({"step": self.global_step,
                                                                    **result})
                    row.update({f"validate/{k}": v for k, v in result.items()})
                    if monitor is not None:
                        best, stale = _track(result, monitor, mode, best, stale)
                if writer is not None:
                    writer.log(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                                     if k.endswith("/loss")}, refresh=False)
                if patience is not None and stale >= patience:
                    self.stopped_at = self.global_step
                    break
        finally:
            if bar is not None:
                bar.close()
            if owned:
                writer.close()
        self.seconds = time.perf_counter() - start
        return self.history

    def _latest(self, losses: dict) -> dict:
        row = {}
        for name in losses:
            entry = self.history[name][-1]
            row.update({f"{name}/{k}": v for k, v in entry.items() if k != "step"})
        return row


def _track(result: dict, monitor: str, mode: str, best, stale):
    if monitor not in result:
        raise MloError(f"Program.run: monitor='{monitor}', but validate returned "
                       f"{sorted(result)}; return that metric from validate or change monitor.")
    value = result[monitor]
    improved = best is None or (value < best if mode == "min" else value > best)
    return (value, 0) if improved else (best, stale + 1)


def _check_run(steps, every, monitor, mode, patience, validate) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MloError(f"Program.run: steps must be a non-negative integer, got {steps!r}.")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise MloError(f"Program.run: every must be a positive integer, got {every!r}.")
    if mode not in ("min", "max"):
        raise MloError(f"Program.run: mode must be 'min' or 'max', got {mode!r}.")
    if (monitor is None) != (patience is None) or (monitor is not None and validate is None):
        raise MloError("Program.run: early stopping needs validate=..., monitor='metric' and "
                       "patience=k together.")


def _bar(steps: int, progress: bool | None):
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="step", dynamic_ncols=True)
