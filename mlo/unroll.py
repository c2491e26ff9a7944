"""Recorded unrolls for iterative differentiation (ITD)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .optim import FunctionalOptimizer


@dataclass
class Window:
    """A lower level's steps since an upper level's last step, enough to replay them differentiably.

    Holds the starting parameters and optimizer state (copies), and per step the micro-batches, a
    snapshot of the optimizer's hyperparameters (so scheduled learning rates replay exactly) and
    the random number generator's state before the step's costs ran (so a replay draws the same
    dropout masks and other random numbers as the real step: it differentiates the trajectory
    that was taken). Batches are kept by reference, not copied. A new window replaces the old one at each upper
    step, so the memory held never grows beyond one unroll.
    """

    params: dict
    state: dict
    batches: list = field(default_factory=list)
    optimizers: list = field(default_factory=list)
    rng: list = field(default_factory=list)
    values: list = field(default_factory=list)  # live windows: θ after each step (None: replayed exactly)
    points: list = field(default_factory=list)  # itd(recompute=True): (θ_t, state_t), t ≥ 1
    reads: list = field(default_factory=list)  # per step: {level: its values then} (`record`)
    live: Any = None  # a `live.Trajectory` while the real steps record this window's graph
    _versions: dict = field(default_factory=dict, repr=False)  # level -> (versions, values)

    @property
    def steps(self) -> int:
        return len(self.batches)

    @classmethod
    def start(cls, level) -> "Window":
        named = level.named_parameters()
        mirror = FunctionalOptimizer.from_optimizer(level.optimizer, named, level=level.name)
        return cls({k: p.detach().clone() for k, p in named.items()},
                   mirror.state(level.optimizer, named))

    def record(self, level, micro_batches: list, rule: FunctionalOptimizer | None = None,
               rng: dict | None = None, keep: str | None = None, every: int = 1,
               reads: dict | None = None) -> None:
        """Record a step about to be taken on `micro_batches` (with `rule`, if already read;
        `rng`, the generator state its costs started from, from `rng_state`). With `keep` (a
        device, for `itd(recompute=True)`) the step's starting point is kept there too: the
        parameters and optimizer state, copied before the step changes them (at every `every`-th
        step; None at the others).

        `reads` are the other levels the step's cost reads that may step before the replay
        (another upper level of this level, a level below it), by name: their parameters. The
        replay runs on their values at this step (the trajectory that was taken), not on the
        values they have then. A level's values are copied once per change (`p._version`),
        shared by the steps that read the same ones."""
        self.reads.append({name: self._copy(name, params)
                           for name, params in (reads or {}).items()})
        if keep is not None and self.batches:  # a step after the first: its starting point
            # None where not kept: recomputed from the last kept point when needed
            self.points.append(_point(level, keep) if len(self.batches) % every == 0 else None)
        self.batches.append(list(micro_batches))
        self.rng.append(rng)
        self.optimizers.append(rule or FunctionalOptimizer.from_optimizer(
            level.optimizer, level.named_parameters(), level.options.clip_grad, level.name))

    def _copy(self, name: str, params: dict) -> dict:
        """A copy of level `name`'s `params`: the one made last, while none of them changed."""
        versions = tuple((id(p), p._version) for p in params.values())
        held = self._versions.get(name)
        if held is None or held[0] != versions:
            held = self._versions[name] = (versions, {k: p.detach().clone()
                                                      for k, p in params.items()})
        return held[1]

    def drop_last(self) -> None:
        """Forget the step recorded last: it was skipped (a non-finite loss or gradient), so the
        window's trajectory, like the module, goes on from where it was before it."""
        if self.points and len(self.points) == len(self.batches) - 1:
            self.points.pop()
        for records in (self.batches, self.rng, self.optimizers, self.reads):
            records.pop()


def _point(level, device) -> tuple[dict, dict]:
    """Copies, on `device`, of a level's parameters and optimizer state (mirror's names)."""
    named = level.named_parameters()
    mirror = FunctionalOptimizer.from_optimizer(level.optimizer, named, level=level.name)
    state = mirror.state(level.optimizer, named, copy=False)
    return ({k: p.detach().to(device, copy=True) for k, p in named.items()},
            {k: {n: x.to(device, copy=True) for n, x in entry.items()} for k, entry in state.items()})


def level_device(level) -> torch.device:
    """The device of a level's parameters (CPU for a level without any)."""
    for p in level.named_parameters().values():
        return p.device
    return torch.device("cpu")


def rng_state(device: torch.device) -> dict:
    """The state of the generators a cost on `device` draws from (CPU, and that CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def replaying(state: dict | None, device: torch.device):
    """Run the block from the generator state `state` (None: as it is), then restore the state
    the generators had: a replay must not change what later real steps draw."""
    if state is None:
        yield
        return
    saved = rng_state(device)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    try:
        yield
    finally:
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"], device)
