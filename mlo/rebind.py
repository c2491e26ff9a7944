"""Run a module with other tensors in place of some of its parameters and buffers.

`call(module, tensors, args, kwargs)` computes what `torch.func.functional_call(module, tensors,
args, kwargs, strict=False)` computes, at a fraction of its per-call cost: the slots (the
`_parameters` / `_buffers` dict and key) of every name are found once per module and cached;
a call puts the given tensors there, runs the module and puts the originals back, also when the
forward raises. That cost matters on small levels, whose functional steps (live ITD windows,
hypergradient passes) run thousands of times.

`functional_call` itself runs where the shortcut would not be exact: a module that holds one
tensor under two names (tied weights, which `functional_call` rebinds together), names the cache
does not know, or a slot that no longer holds the tensor it held when cached (a parameter or
buffer reassigned since: the cache is then rebuilt). A submodule replaced since the cache was
built is seen too (the cache keeps every parent-child link and checks them at each call).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.func import functional_call

_SLOTS: "weakref.WeakKeyDictionary[nn.Module, dict | None]" = weakref.WeakKeyDictionary()


def call(module: nn.Module, tensors: dict[str, torch.Tensor], args, kwargs):
    cached = _slots(module)
    if cached is not None and not _current(cached, tensors):  # reassigned since: look again
        _SLOTS.pop(module, None)
        cached = _slots(module)
    if cached is None or not _current(cached, tensors):
        return functional_call(module, tensors, args, kwargs, strict=False)
    slots = cached[0]
    saved = []
    try:
        for name, tensor in tensors.items():
            store, key, original = slots[name]
            saved.append((store, key, original))
            store[key] = tensor
        return module(*args, **kwargs)
    finally:
        for store, key, original in saved:
            store[key] = original


def _current(cached: tuple, tensors: dict) -> bool:
    """Whether the module tree is as cached, and every name is cached with its slot still
    holding the tensor it held then."""
    slots, links = cached
    for children, key, child in links:
        if children.get(key) is not child:
            return False
    for name in tensors:
        slot = slots.get(name)
        if slot is None or slot[0].get(slot[1]) is not slot[2]:
            return False
    return True


def _slots(module: nn.Module) -> tuple | None:
    """({dotted name: (dict, key, tensor held)} for every parameter and buffer, [(a module's
    `_modules`, key, child)] for every link of the tree), or None where a tensor is reachable
    under two names."""
    if module in _SLOTS:
        return _SLOTS[module]
    slots, seen = {}, set()
    links = [(owner._modules, key, child) for _, owner in module.named_modules(remove_duplicate=False)
             for key, child in owner._modules.items()]
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for store in (owner._parameters, owner._buffers):
            for key, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) in seen:
                    _SLOTS[module] = None
                    return None
                seen.add(id(tensor))
                slots[f"{prefix}.{key}" if prefix else key] = (store, key, tensor)
    _SLOTS[module] = slots, links
    return slots, links
