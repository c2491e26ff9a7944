"""A level's stream of batches: restarts its data when exhausted and can resume mid-epoch."""

from __future__ import annotations

import torch

from . import distributed
from .errors import MloError


class Stream:
    """Draw batches from a level's `data`, re-iterating it at the end of each epoch.

    It remembers the epoch, the batches drawn in it, and the torch RNG state at the moment the
    epoch's iterator was created; resuming sets that RNG state, re-creates the iterator and skips
    the batches already drawn, so a shuffled `DataLoader` continues with the same batches an
    uninterrupted run would have seen.
    """

    def __init__(self, data, level: str):
        self.data = distributed.shard(data) if distributed.world_size() > 1 else data
        self.level = level
        self.epoch, self.position = 0, 0
        self._iterator = None
        self._rng = torch.get_rng_state()
        self.last = None  # the batch drawn most recently, for explaining a failed step

    def next(self, step: int):
        if type(self.data) in (list, tuple) and self.data:  # indexed: no iterator to restart
            if self.position >= len(self.data):
                self.epoch, self.position = self.epoch + 1, 0
            self.last = self.data[self.position]
            self.position += 1
            return self.last
        for _ in range(2):
            if self._iterator is None:
                self._start()
            try:
                self.last = next(self._iterator)
                self.position += 1
                return self.last
            except StopIteration:
                self._iterator = None
                self.epoch, self.position = self.epoch + 1, 0
            except Exception as error:
                raise MloError(
                    f"Program.step (step {step}): level '{self.level}': its data raised "
                    f"{type(error).__name__} drawing batch {self.position} of epoch {self.epoch} "
                    f"({str(error).splitlines()[0] if str(error) else ''}); the original error "
                    f"is chained above.") from error
        raise MloError(f"Program.step (step {step}): level '{self.level}': its data yielded no "
                       f"batch after a restart; pass a re-iterable (a list or a DataLoader), not "
                       f"a one-shot iterator or an empty dataset.")

    def _start(self) -> None:
        distributed.set_epoch(self.data, self.epoch)
        if not isinstance(self.data, (list, tuple)):  # iterating a list draws no random numbers
            self._rng = torch.get_rng_state()
        self._iterator = iter(self.data)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rng": self._rng}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iterator = state["epoch"], 0, None
        if state["position"] == 0:
            return
        current = torch.get_rng_state()
        torch.set_rng_state(state["rng"])
        self._start()
        for _ in range(state["position"]):
            next(self._iterator)
        self.position = state["position"]
        torch.set_rng_state(current)
