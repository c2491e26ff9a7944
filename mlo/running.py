"""`Program.run`: the loop around `Program.step`, with progress, validation and the history."""

from __future__ import annotations

import sys
import time

from .errors import MloError


class Runner:
    """The `run` loop of `Program` (kept apart from the schedule and the maths)."""

    def run(self, steps: int, *, validate=None, every: int | None = None, log=None,
            progress: bool | None = None) -> dict[str, list[dict]]:
        """Run `steps` global steps; return the metrics history (per level, per step).

        `validate(program)` is called every `every` steps (and after the last step) and may
        return a dict of metrics, kept under `history["validate"]`. `log` receives each step's
        losses through `log.log(dict)`. A progress bar (tqdm) shows each level's latest loss and
        the steps per second when attached to a terminal; `progress=False` silences it.
        """
        if not isinstance(steps, int) or steps < 0:
            raise MloError(f"Program.run: steps must be a non-negative integer, got {steps!r}.")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise MloError(f"Program.run: every must be a positive integer, got {every!r}.")
        bar = _bar(steps, progress)
        start = time.perf_counter()
        for i in range(steps):
            losses = self.step()
            if log is not None:
                log.log({"step": self.global_step, **losses})
            if validate is not None and ((every and (i + 1) % every == 0) or i + 1 == steps):
                result = validate(self)
                if result:
                    self.history.setdefault("validate", []).append(
                        {"step": self.global_step, **result})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({n: f"{h[-1]['loss']:.4g}" for n, h in self.history.items()
                                 if h and n != "validate"}, refresh=False)
        if bar is not None:
            bar.close()
        self.seconds = time.perf_counter() - start
        return self.history


def _bar(steps: int, progress: bool | None):
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="step", dynamic_ncols=True)
