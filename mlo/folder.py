"""A run's checkpoint folder: periodic checkpoints by step, the newest `keep` kept, and the best."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from . import checkpoint, distributed
from .errors import CheckpointError, MloError


class Folder:
    """The checkpoints of one run: `step-000000500.pt`, ... and `best.pt` in one folder.

    Under data parallelism every rank writes its own files (`step-000000500.rank1.pt`): each
    rank's data position, RNG state and recorded batches are its own. Saves are atomic (see
    `mlo.checkpoint.save`); temporary files left by a process killed during a save are removed
    when the folder is opened. One run writes into a folder at a time.

    Example::

        folder = Folder("runs/exp1", keep=3)
        folder.save(program.state_dict(), program.global_step)
        state = folder.latest()                       # None in an empty folder
    """

    def __init__(self, path, keep: int = 3):
        self.path, self.keep = Path(path), keep
        if self.path.exists() and not self.path.is_dir():
            raise MloError(f"Program.run: checkpoint={str(path)!r} is a file; pass a folder "
                           f"(it holds one file per saved step).")
        self.path.mkdir(parents=True, exist_ok=True)
        rank = distributed.rank()
        self._suffix = ".pt" if distributed.world_size() == 1 else f".rank{rank}.pt"
        pattern = re.escape(self._suffix)
        self._step_file = re.compile(rf"^step-(\d+){pattern}$")
        leftover = re.compile(rf"^\.(step-\d+|best){pattern}\..*\.tmp$")
        for file in self.path.iterdir():
            if leftover.match(file.name):
                file.unlink(missing_ok=True)

    def file(self, step: int) -> Path:
        return self.path / f"step-{step:09d}{self._suffix}"

    def steps(self) -> list[int]:
        """Return the steps of this rank's checkpoints in the folder, oldest first."""
        found = (self._step_file.match(f.name) for f in self.path.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, state: dict, step: int) -> None:
        """Write the checkpoint of `step` and delete all but the newest `keep` ones."""
        checkpoint.save(state, self.file(step))
        for old in self.steps()[:-self.keep]:
            self.file(old).unlink(missing_ok=True)

    def _check_layout(self) -> None:
        """Refuse a folder written by a run with another number of ranks (it would look empty)."""
        found = [re.match(r"^step-\d+(?:\.rank(\d+))?\.pt$", f.name) for f in self.path.iterdir()]
        ranks = {int(m.group(1)) + 1 if m.group(1) else 1 for m in found if m}
        if ranks and not self.steps():
            raise CheckpointError(
                f"Program.run: the folder {self.path} holds checkpoints of a run with "
                f"{max(ranks)} rank(s), this run has {distributed.world_size()}; each rank's "
                f"data position, RNG state and recorded batches are its own, so resume with the "
                f"same number of ranks.")

    def latest(self) -> dict | None:
        """Return the newest checkpoint that loads (the same step on every rank), or None.

        A file that does not load (damaged outside mlo: atomic saves never leave one) is
        skipped with a warning, falling back to the one before it.
        """
        self._check_layout()
        step, state = -1, None
        for candidate in reversed(self.steps()):
            try:
                step, state = candidate, checkpoint.load(self.file(candidate))
                break
            except CheckpointError as error:
                warnings.warn(f"Program.run: skipping checkpoint {self.file(candidate)}: {error}")
        common = distributed.smallest(step)
        if common == step:
            return state
        if common < 0:
            return None
        return checkpoint.load(self.file(common))  # another rank was killed before saving `step`

    def save_best(self, state: dict) -> None:
        checkpoint.save(state, self.path / f"best{self._suffix}")

    def load_best(self) -> dict:
        return checkpoint.load(self.path / f"best{self._suffix}")


def latest_file(path) -> Path:
    """Return the newest checkpoint file of a run's folder (for `Program.load(folder)`)."""
    folder = Folder(path)
    steps = folder.steps()
    if not steps:
        raise CheckpointError(f"Program.load: the folder {path} holds no checkpoint "
                              f"(step-*.pt files); check the path.")
    return folder.file(steps[-1])
