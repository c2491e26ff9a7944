"""Checks of what a level is given (at decoration), of what spans levels (at `Program(...)`), and
explanations of failures inside a level step."""

from __future__ import annotations

import re
import warnings

import torch

from .errors import GraphError, LevelError, MloWarning, OptimizerError


def check_trainable(prefix: str, module, optimizer) -> None:
    """Require something to train: trainable, materialized parameters and no negative lr."""
    params = [module] if isinstance(module, torch.Tensor) else \
        [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise LevelError(f"{prefix} the module has no trainable parameters (none, or all frozen), "
                         f"so this level has nothing to learn; unfreeze some, or call the module "
                         f"inside another level's cost instead.")
    if any(p.is_meta for p in params):
        raise LevelError(f"{prefix} the module's parameters are on the meta device (shapes "
                         f"without values); materialize them first, e.g. "
                         f"module.to_empty(device='cpu') and initialize its weights.")
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr", 0.0)
        if float(lr.detach() if isinstance(lr, torch.Tensor) else lr) < 0:
            raise LevelError(f"{prefix} the optimizer's param group {index} has lr={group['lr']}; "
                             f"a negative learning rate climbs the cost. Use lr > 0 (to maximize "
                             f"a quantity, return its negative as the loss).")


def check_data_length(prefix: str, data, grad_accum: int) -> None:
    """Require data with at least one batch, and at least `grad_accum` per epoch."""
    try:
        length = len(data) if data is not None else None
    except TypeError:  # iterables without a length (generators, IterableDataset loaders)
        return
    if length == 0:
        raise LevelError(f"{prefix} data is empty (length 0), so this level has no batch to "
                         f"step on; pass a non-empty dataset, or data=None for a level without "
                         f"data.")
    if length is not None and grad_accum > length:
        raise LevelError(f"{prefix} grad_accum={grad_accum} exceeds the {length} batches of "
                         f"data per epoch, so one optimizer step would reuse batches; lower "
                         f"grad_accum to at most {length}, or use smaller batches.")


def check_shared(levels) -> None:
    """Refuse two levels that hold the same parameter tensor (one module given to both, say).

    Each level's optimizer updates its parameters, so a shared one would be stepped by two
    optimizers at two rates, and no hypergradient could tell the levels apart.
    """
    owners: dict[int, tuple[str, str]] = {}
    for level in levels:
        for key, param in level.named_parameters().items():
            other = owners.setdefault(id(param), (level.name, key))
            if other[0] != level.name:
                raise GraphError(
                    f"Program: levels '{other[0]}' and '{level.name}' share a parameter "
                    f"('{other[1]}' of '{other[0]}' is '{key}' of '{level.name}'); each level "
                    f"trains its own. Give each level its own module (copy.deepcopy(module)), or "
                    f"let one level read the other's parameters through its handle.")


def explain(program, name: str, batch, step: int, error: RuntimeError) -> None:
    """Re-raise a device or dtype clash between a level's batch and parameters as a LevelError
    (raise `error` itself otherwise).

    Only failures torch already raised are explained (a cost may legitimately convert its batch),
    and the original error stays chained. Cost: nothing unless the step raises.
    """
    stream = program._streams.get(name)
    drawn = batch if batch is not None else getattr(stream, "last", None)
    hint = _clash(program, program.levels[name], _first_float(drawn), str(error))
    if hint is None:
        raise error
    raise LevelError(f"Program.step (step {step}): level '{name}': {hint}") from error


def _clash(program, level, tensor, message: str) -> str | None:
    if tensor is None:
        return None
    for lv in [level] + [program.levels[other] for other, _ in level.names]:
        param = next(iter(lv.named_parameters().values()), None)
        if param is None:
            continue
        owner = "its module's parameters" if lv is level else f"the parameters of level '{lv.name}'"
        if tensor.device != param.device and "device" in message:
            return (f"its batch is on {tensor.device}, but {owner} are on "
                    f"{param.device}; put both on one device (move the batch in the data "
                    f"pipeline, or the module with .to(device)).")
        if tensor.dtype != param.dtype and re.search(r"dtype|scalar type|type \(", message):
            have, want = str(tensor.dtype)[6:], str(param.dtype)[6:]
            return (f"its batch is {have}, but {owner} are {want}; use one dtype: "
                    f"convert the batch to {want} in the data pipeline, or the module with "
                    f".to(torch.{have}).")
    return None


def _first_float(batch):
    """Return the first floating-point tensor in a batch of tensors and containers, or None."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.is_floating_point() else None
    values = batch.values() if isinstance(batch, dict) else batch \
        if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_float(value)
        if found is not None:
            return found
    return None


def refuse_learned_hyperparameters(levels) -> None:
    """Refuse an optimizer hyperparameter given as a tensor that requires grad, unless it is a
    level's parameter itself.

    A level's own parameter as a hyperparameter is a learned hyperparameter (`mlo.meta`: ITD
    differentiates the update through it, and `meta.learned_hyperparameters` checks who owns
    it). A view of one, or a tensor computed from parameters, is read by the update where mlo
    cannot differentiate it: its owner would receive an exactly zero hypergradient. Cost: one
    pass over every optimizer's param groups.
    """
    owned = {id(p) for lv in levels for p in lv.named_parameters().values()}
    for lv in levels:
        for group in lv.optimizer.param_groups:
            for option, value in group.items():
                values = () if option == "params" else \
                    value if isinstance(value, (tuple, list)) else (value,)
                for t in values:
                    if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in owned:
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
