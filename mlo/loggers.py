"""Metric writers for `Program.run(log=...)`: JSON lines, CSV, TensorBoard and Weights & Biases.

A logger is any object with `log(metrics: dict)` (and optionally `close()`); each call receives
the global step and the losses and metrics of the levels that stepped, keyed `"level/name"`.
`run(log="metrics.jsonl")` or `run(log="metrics.csv")` picks a built-in writer by the suffix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import MloError


class JSONLines:
    """Append one JSON object per logged step to a file."""

    def __init__(self, path):
        self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CSV:
    """Append rows `step,name,value` (long format: levels step at different rates)."""

    def __init__(self, path):
        new = not Path(path).exists() or Path(path).stat().st_size == 0
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["step", "name", "value"])

    def log(self, metrics: dict) -> None:
        step = metrics.get("step")
        self._writer.writerows([step, k, v] for k, v in metrics.items() if k != "step")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """Write scalars with `torch.utils.tensorboard` (needs the `tensorboard` package)."""

    def __init__(self, log_dir=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MloError("mlo.loggers.TensorBoard: the tensorboard package is not installed; "
                           "pip install tensorboard, or log to a .jsonl/.csv file.") from error
        self._writer = SummaryWriter(log_dir)

    def log(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "step":
                self._writer.add_scalar(k, v, metrics.get("step"))

    def close(self) -> None:
        self._writer.close()


class WandB:
    """Log to Weights & Biases (needs the `wandb` package); keyword arguments go to wandb.init."""

    def __init__(self, **init):
        try:
            import wandb
        except ImportError as error:
            raise MloError("mlo.loggers.WandB: the wandb package is not installed; pip install "
                           "wandb, or log to a .jsonl/.csv file.") from error
        self._run = wandb.init(**init)

    def log(self, metrics: dict) -> None:
        self._run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics.get("step"))

    def close(self) -> None:
        self._run.finish()


def resolve(log):
    """Return (logger, whether run() opened it and must close it)."""
    if log is None or callable(getattr(log, "log", None)):
        return log, False
    if isinstance(log, (str, Path)):
        suffix = Path(log).suffix
        if suffix == ".jsonl":
            return JSONLines(log), True
        if suffix == ".csv":
            return CSV(log), True
    raise MloError(f"Program.run: log must be a path ending in .jsonl or .csv, or an object with a "
                   f".log(dict) method (e.g. mlo.loggers.TensorBoard()), got {log!r}.")
