"""Checks `Program(...)` makes on its levels together: what no single `@mlo.level` can see."""

from __future__ import annotations

import warnings

import torch

from .errors import MloWarning, OptimizerError


def refuse_learned_hyperparameters(levels) -> None:
    """Refuse an optimizer hyperparameter given as a tensor that requires grad.

    A learning rate, momentum or any hyperparameter is read by the optimizer's update, which mlo
    does not differentiate: a level owning that tensor (or the parameters it was computed from)
    would receive an exactly zero hypergradient for it. Raised at `Program(...)` until that path
    is differentiable. Cost: one pass over every optimizer's param groups.
    """
    for lv in levels:
        for group in lv.optimizer.param_groups:
            for option, value in group.items():
                values = () if option == "params" else \
                    value if isinstance(value, (tuple, list)) else (value,)
                for t in values:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        raise OptimizerError(_learned(levels, lv.name, option, t))


def _learned(levels, name: str, option: str, tensor: torch.Tensor) -> str:
    owners = {p.untyped_storage().data_ptr(): f"parameter '{key}' of level '{lv.name}'"
              for lv in levels for key, p in lv.named_parameters().items() if p.numel()}
    owner = owners.get(tensor.untyped_storage().data_ptr())
    what = f"{owner} (or a view of it)" if owner else \
        "a tensor computed from parameters" if tensor.grad_fn else "a tensor"
    return (f"Program: level '{name}': its optimizer's {option} is {what}, which requires grad, "
            f"but mlo does not yet differentiate through optimizer updates: it would get an "
            f"exactly zero hypergradient. Give {option} as a number (or a tensor that does not "
            f"require grad) until it is differentiable.")


def warn_fp16_on_cpu(name: str, device_type: str) -> None:
    """Warn (once per level and place, by Python's warning filter) that fp16 runs on CPU."""
    if device_type == "cpu":
        warnings.warn(
            f"Program: level '{name}' has fp16=True but its parameters are on the CPU, where "
            f"float16 autocast runs (with loss scaling) but is usually slower than float32 and "
            f"saves no parameter memory; use bf16=True on CPU, or move the module to a GPU.",
            MloWarning, stacklevel=3)
