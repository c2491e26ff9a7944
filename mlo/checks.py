"""Checks `Program(...)` makes on its levels together: what no single `@mlo.level` can see."""

from __future__ import annotations

import warnings

import torch

from .errors import MloWarning, OptimizerError


def refuse_learned_hyperparameters(levels) -> None:
    """Refuse an optimizer hyperparameter that is (a view of) another level's parameter.

    A learning rate, momentum or any hyperparameter given as a tensor is read by the optimizer's
    update, which mlo does not differentiate: a level that owned that tensor would receive an
    exactly zero hypergradient for it. Raised at `Program(...)` until that path is differentiable.
    Cost: one pass over every optimizer's param groups.
    """
    owners = {}
    for lv in levels:
        for key, p in lv.named_parameters().items():
            if p.numel():  # an empty tensor has no storage to share
                owners[p.untyped_storage().data_ptr()] = (lv.name, key)
    for lv in levels:
        for group in lv.optimizer.param_groups:
            for option, value in group.items():
                if option == "params":
                    continue
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if not isinstance(t, torch.Tensor):
                        continue
                    owner = owners.get(t.untyped_storage().data_ptr())
                    if owner is not None and owner[0] != lv.name:
                        raise OptimizerError(
                            f"Program: level '{lv.name}': its optimizer's {option} is parameter "
                            f"'{owner[1]}' of level '{owner[0]}' (or a view of it), but mlo does "
                            f"not yet differentiate through optimizer updates, so '{owner[0]}' "
                            f"would get an exactly zero hypergradient for it. Give {option} as a "
                            f"number, or a tensor no level trains, until it is differentiable.")


def warn_fp16_on_cpu(name: str, device_type: str) -> None:
    """Warn (once per level and place, by Python's warning filter) that fp16 runs on CPU."""
    if device_type == "cpu":
        warnings.warn(
            f"Program: level '{name}' has fp16=True but its parameters are on the CPU, where "
            f"float16 autocast runs (with loss scaling) but is usually slower than float32 and "
            f"saves no parameter memory; use bf16=True on CPU, or move the module to a GPU.",
            MloWarning, stacklevel=3)
