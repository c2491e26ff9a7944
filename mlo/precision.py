"""Autocast and loss scaling per level: the only module that knows about `GradScaler`."""

from __future__ import annotations

import contextlib

import torch

from . import fast_step

_NO_AUTOCAST = contextlib.nullcontext()

class Precision:
    """A level's compute precision: float16 autocast with dynamic loss scaling, bfloat16, or none.

    fp16 uses one `torch.amp.GradScaler` per level: gradients are computed on the scaled loss and
    unscaled before clipping; a step whose gradients overflowed is skipped (never applied) and
    counted in `overflows`. bf16 needs no scaling and works on CPU.
    """

    def __init__(self, fp16: bool, bf16: bool, device_type: str):
        self.device_type = device_type
        self.dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
        self.scaler = torch.amp.GradScaler(device_type) if fp16 else None
        self.overflows = 0

    def autocast(self):
        """Return the context that runs this level's cost in its compute dtype."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale_loss(self, loss):
        """Return the loss multiplied by the current loss scale (the loss itself without fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    @property
    def scale(self) -> float:
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients in `.grad` by the loss scale (before clipping)."""
        if self.scaler is not None and _has_grads(optimizer):
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step `optimizer` unless its gradients overflowed; return whether the step was applied."""
        if self.scaler is None:
            fast_step.step(optimizer)
            return True
        if not _has_grads(optimizer):
            return True  # nothing to unscale or check: the step is a no-op, as in plain torch
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        applied = self.scaler.get_scale() >= before
        self.overflows += not applied
        return applied

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else {}, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.overflows = state["overflows"]


def _has_grads(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])
