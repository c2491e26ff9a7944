"""Recorded unrolls for iterative differentiation (ITD)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .optim import FunctionalOptimizer


@dataclass
class Window:
    """A lower level's steps since an upper level's last step, enough to replay them differentiably.

    Holds the starting parameters and optimizer state (copies), and per step the micro-batches and
    a snapshot of the optimizer's hyperparameters (so scheduled learning rates replay exactly).
    Batches are kept by reference, not copied. A new window replaces the old one at each upper
    step, so the memory held never grows beyond one unroll.
    """

    params: dict
    state: dict
    batches: list = field(default_factory=list)
    optimizers: list = field(default_factory=list)
    live: Any = None  # a `live.Trajectory` while the real steps record this window's graph

    @property
    def steps(self) -> int:
        return len(self.batches)

    @classmethod
    def start(cls, level) -> "Window":
        named = level.named_parameters()
        mirror = FunctionalOptimizer.from_optimizer(level.optimizer, named, level=level.name)
        return cls({k: p.detach().clone() for k, p in named.items()},
                   mirror.state(level.optimizer, named))

    def record(self, level, micro_batches: list, rule: FunctionalOptimizer | None = None) -> None:
        """Record a step about to be taken on `micro_batches` (with `rule`, if already read)."""
        self.batches.append(list(micro_batches))
        self.optimizers.append(rule or FunctionalOptimizer.from_optimizer(
            level.optimizer, level.named_parameters(), level.options.clip_grad, level.name))
