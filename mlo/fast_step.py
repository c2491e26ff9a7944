"""A level's optimizer step without the per-call overhead of `optimizer.step()`, same numbers.

`torch.optim` wraps every `step()` in a profiler annotation, hook dispatch and a grad-mode
switch: about 15 µs of Python per call on CPU, which shows on small levels stepped thousands of
times (a logistic regression's inner step is a few tens of µs of arithmetic). Where nothing can
observe the difference, mlo skips that wrapper:

- plain `torch.optim.SGD` (no momentum, weight decay, maximize; a float lr; foreach and fused
  off or unset) on CPU parameters: `p.add_(p.grad, alpha=-lr)` for each parameter with a
  gradient, the very update of its single-tensor implementation, issued as one
  `torch._foreach_add_` per param group (on CPU that runs the same `add_` per tensor);
- any other optimizer of `torch.optim` (SGD, Adam, AdamW, ...): its own `step` function called
  without the wrapper, under `torch.no_grad()`, i.e. the same code on the same state.

"Nothing can observe it" means: the optimizer's class is one of `torch.optim` itself (not a
subclass), it is not `differentiable`, it has no step hooks of its own and none are registered
globally (`register_optimizer_step_pre_hook` / `_post_hook`), its instance's `step` is not
wrapped (a learning-rate scheduler wraps it to check the call order: such a level takes the
usual path), and no profiler is running (whose "Optimizer.step" annotation would then be
missing). Otherwise `optimizer.step()` runs as usual.
Bit-for-bit equality with `optimizer.step()` is tested (tests/test_fast_step.py).
"""

from __future__ import annotations

import torch
from torch.optim import optimizer as _optimizer

_RAW: dict = {}  # optimizer class -> its unwrapped step function (None: none known)

def step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()`, skipping its wrapper where nothing can observe the difference."""
    raw = _unwrapped(optimizer)
    if raw is None:
        optimizer.step()
    elif plain_cpu_sgd(optimizer):
        with torch.no_grad():
            for group in optimizer.param_groups:
                stepped = [p for p in group["params"] if p.grad is not None]
                if stepped:  # on CPU: p.add_(p.grad, alpha=-lr) for each, in one call
                    torch._foreach_add_(stepped, [p.grad for p in stepped], alpha=-group["lr"])
    else:
        with torch.no_grad():
            raw(optimizer)


def _unwrapped(optimizer: torch.optim.Optimizer):
    """The class's own step function, or None where the wrapper must run."""
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _optimizer._global_optimizer_pre_hooks or _optimizer._global_optimizer_post_hooks
            or torch.autograd.profiler._is_profiler_enabled or "step" in vars(optimizer)
            or optimizer.defaults.get("differentiable")):
        return None
    cls = type(optimizer)
    if cls not in _RAW:
        _RAW[cls] = _raw_step(cls)
    return _RAW[cls]


def _raw_step(cls):
    """`cls.step` without its two wrappers, for optimizers of torch.optim itself; else None."""
    if cls.__module__.rsplit(".", 1)[0] != "torch.optim" or not getattr(cls.step, "hooked", False):
        return None
    wrapped = cls.step
    for _ in range(2):  # profile_hook_step, then _use_grad_for_differentiable
        wrapped = getattr(wrapped, "__wrapped__", None)
        if wrapped is None:
            return None
    return wrapped


def plain_cpu_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is plain SGD on CPU: its step is `p.add_(p.grad, alpha=-lr)` per
    parameter (the functional mirror's `torch.add(p, g, alpha=-lr)`, bit for bit)."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    for group in optimizer.param_groups:
        if (group["momentum"] or group["weight_decay"] or group["maximize"]
                or group.get("foreach") or group.get("fused") or type(group["lr"]) is not float):
            return False
        for p in group["params"]:
            if p.device.type != "cpu" or p.is_sparse:
                return False
    return True
