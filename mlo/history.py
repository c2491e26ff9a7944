"""`program.history`: every level's losses and metrics per step, in bounded memory."""

from __future__ import annotations

import math
from array import array

import torch

LIMIT = 10_000


class Series:
    """The entries `{"step": s, "loss": x, ...metrics}` of one level (or validation), oldest first.

    Stored as columns of float64 (the step as int64), 8 bytes per value instead of a dict per
    step. Memory is bounded: when `limit` rows are held, every other row of the older half is
    dropped, so the newest `limit // 2` entries are always exact and older ones are kept at a
    resolution that halves with age (every 2nd, 4th, ... step); `count` is the number of entries
    ever appended. A metric absent from some entries reads as nan there. It behaves as a read-only
    list of dicts: `series[-1]["loss"]`, `len(series)`, iteration, slicing, `== [...]`.

    Cost: appending is amortized O(1); reading an entry builds one small dict.

    Example::

        losses = [entry["loss"] for entry in program.history["inner"]]
        program.history["inner"].column("loss")      # the same, as a list of floats
    """

    def __init__(self, limit: int = LIMIT):
        self.limit, self.count = limit, 0
        self._steps = array("q")
        self._columns: dict[str, array] = {}

    def append(self, entry: dict) -> None:
        """Append one entry: a dict with an integer "step" and float-convertible values."""
        for key, value in entry.items():
            if key != "step" and key not in self._columns:
                self._columns[key] = array("d", [math.nan]) * len(self._steps)
        self._steps.append(int(entry["step"]))
        for key, column in self._columns.items():
            column.append(float(entry.get(key, math.nan)))
        self.count += 1
        if len(self._steps) >= self.limit:
            self._thin()

    def _thin(self) -> None:
        half = len(self._steps) // 2
        self._steps = self._steps[:half:2] + self._steps[half:]
        for key, column in self._columns.items():
            self._columns[key] = column[:half:2] + column[half:]

    def column(self, key: str) -> list:
        """Return one column ("step", "loss" or a metric) of the held entries as a list."""
        return list(self._steps) if key == "step" else list(self._columns[key])

    def _entry(self, i: int) -> dict:
        entry = {"step": self._steps[i]}
        entry.update((k, c[i]) for k, c in self._columns.items())
        return entry

    def __len__(self) -> int:
        return len(self._steps)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._entry(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"history index {index} out of range ({len(self)} entries held)")
        return self._entry(index)

    def __iter__(self):
        return (self._entry(i) for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, (Series, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        last = f", last {self._entry(-1)}" if len(self) else ""
        return f"<history: {len(self)} entries held of {self.count}{last}>"

    def state_dict(self) -> dict:
        columns = {k: torch.tensor(c.tolist(), dtype=torch.float64)
                   for k, c in self._columns.items()}
        return {"limit": self.limit, "count": self.count, "columns": columns,
                "steps": torch.tensor(self._steps.tolist(), dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict) -> "Series":
        series = cls(state["limit"])
        series.count = state["count"]
        series._steps = array("q", state["steps"].tolist())
        series._columns = {k: array("d", c.tolist()) for k, c in state["columns"].items()}
        return series


class History(dict):
    """`program.history`: a `Series` per level name, plus "validate" once `run` has validated.

    Each series holds at most `limit` entries (default 10,000; see `Series`), so a run of any
    length keeps a bounded amount: about 8 bytes × (2 + number of metrics) × limit per level.
    """

    def __init__(self, names=(), limit: int = LIMIT):
        super().__init__({name: Series(limit) for name in names})
        self.limit = limit

    def series(self, name: str) -> Series:
        """Return the series of `name`, creating an empty one (e.g. for "validate")."""
        if name not in self:
            self[name] = Series(self.limit)
        return self[name]

    def state_dict(self) -> dict:
        return {"limit": self.limit, "series": {n: s.state_dict() for n, s in self.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "History":
        history = cls(limit=state["limit"])
        history.update({n: Series.from_state(s) for n, s in state["series"].items()})
        return history
