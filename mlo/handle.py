"""Handles: what a cost function receives for `module` and for each level it names."""

from __future__ import annotations

import torch
from torch.func import functional_call


class Handle:
    """Run a level's module with given parameters; `params=None` means its live parameters.

    Calling the handle of an `nn.Module` level runs `module(*args, **kwargs)` functionally with
    `params` (buffers and frozen parameters come from the module); the handle of a bare tensor
    level returns the tensor. `handle.params` is the parameter dict in use.
    """

    __slots__ = ("level", "_params")

    def __init__(self, level, params: dict[str, torch.Tensor] | None = None):
        self.level, self._params = level, params

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._params if self._params is not None else self.level.named_parameters()

    def __call__(self, *args, **kwargs):
        module = self.level.module
        if isinstance(module, torch.Tensor):
            if args or kwargs:
                raise TypeError(f"level '{self.level.name}' is a tensor of hyperparameters; call "
                                f"its handle with no arguments to get it.")
            return module if self._params is None else self._params["param"]
        if self._params is None:
            return module(*args, **kwargs)
        # Functional passes (hypergradients) run on copies of the buffers: BatchNorm's running
        # statistics are not advanced by them, and torch.func transforms allow the in-place update
        buffers = {k: b.clone() for k, b in module.named_buffers()}
        return functional_call(module, {**self._params, **buffers}, args, kwargs, strict=False)

    def __repr__(self) -> str:
        return f"<handle of level '{self.level.name}'>"
