"""Sharded levels: `@mlo.level(..., shard=True)` keeps a level's parameters, gradients and
optimizer state sharded across ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`).

What is sharded, and when it is gathered:

- **Between steps** each rank holds 1/N of the level's parameters, of their gradients and of its
  optimizer state (DTensor shards); buffers (running statistics) are replicated.
- **The level's own real steps** run through FSDP2's hooks: each unit's parameters are gathered
  for its forward and again for its backward pass, one unit at a time, and the gradient is
  reduce-scattered (averaged over ranks) per unit as the backward pass produces it. The units are
  the children of every `nn.Sequential` and `nn.ModuleList` in the module that hold parameters,
  then the module itself. The gradient is taken with `loss.backward()`, because FSDP2 reduces in
  hooks that read `.grad` of its gathered parameters: `torch.autograd.grad` to the sharded
  parameters returns None for every one of them (they are not in the graph of the forward
  pass). Other levels' `.grad`, which that backward pass may reach, is kept as it was.
- **Every other pass** that reads the level's parameters (an upper level's real step and its
  hypergradient, the handle check) runs the module as its unsharded *twin*: a copy of the
  module made before sharding, whose parameters are empty (meta) and whose buffers are the
  module's own, called functionally with the tensors of the pass. The twin is needed because
  FSDP2's forward hooks install the module's own gathered parameters, so a functional call of
  the sharded module itself would silently run on its live parameters. Those tensors are this
  rank's shards, each unit of the twin gathering its own when called (`mlo.shards`): the
  vectors of a hypergradient (v, CG's iterates, the products) stay shard-sized, and the result
  equals the unsharded program's (for `itd`, one process's: see `mlo.shards`). Two passes
  still gather the full parameters once, with full-sized vectors as in unsharded data
  parallelism (`full`): `itd` with a clipped update, and a pass in which a sharded level is
  differentiated against (a source of a path).

Measured (`python -m benchmarks.memory_per_rank`, a 19.7M-parameter lower level on 2 gloo
ranks): a rank's peak of tensors (held + pass) is 0.51× the unsharded ranks' for `aid_fd`,
0.54× for `aid_cg` and 0.58× for `itd` (whose second-order backward passes keep the recorded
graph's activations; `mlo.shards` on the weights they read twice).

Checkpoints are per rank (as for data parallelism): each rank saves its own shards (local tensors
with the global shape) and resumes them on as many ranks. A level is sharded when a `Program` is
built under a process group of more than one rank (first broadcasting rank 0's values); with one
process `shard=True` changes nothing. Its optimizer is kept (param groups, defaults, scheduler)
and moved onto the sharded parameters.

Besides `mlo.distributed`, this module and `mlo.shards` are the ones that use
`torch.distributed`: here FSDP2 and DTensor, lazily (only where a level is sharded), with no
collective of its own other than DTensor's gather; `mlo.shards` issues the all-gathers and
reduce-scatters of the passes on shards.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import weakref

import torch
from torch import nn

from . import distributed, shards
from .errors import CheckpointError, HandleError

_TWINS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
SHARD = "mlo/shard"  # a checkpoint entry holding one rank's shard of a DTensor


def is_fsdp(module) -> bool:
    """Whether `module` was sharded by `fully_shard` (without importing FSDP where nobody did)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def shard(level) -> None:
    """Shard `level.module` with `fully_shard` and move its optimizer onto the new parameters.

    The optimizer keeps its param groups (hyperparameters included) and its state (moved onto
    the shards); a scheduler built on it stays valid. A module sharded earlier (by another
    `Program` over the same level) is left as it is.
    """
    from torch.distributed.fsdp import fully_shard

    module = level.module
    if module in _TWINS:
        return
    level.refresh()
    distributed.broadcast_level(level)  # rank 0's values, as for any level, before sharding
    old = dict(module.named_parameters())
    twin = _twin(module)
    units = [child for parent in module.modules() if isinstance(parent, (nn.Sequential, nn.ModuleList))
             for child in parent.children() if any(True for _ in child.parameters())]
    paths = {id(m): path for path, m in module.named_modules()}
    shards.units(twin, [paths[id(unit)] for unit in units] + [""])
    for unit in reversed(units):  # inner units first, as fully_shard requires
        fully_shard(unit)
    fully_shard(module)
    new = dict(module.named_parameters())
    moved = {id(p): new[name] for name, p in old.items()}
    for group in level.optimizer.param_groups:
        group["params"] = [moved[id(p)] for p in group["params"]]
    state = level.optimizer.state
    for name, p in old.items():
        if p in state:
            state[new[name]] = {k: _local_of(v, new[name]) for k, v in state.pop(p).items()}
    for (_, sharded), (_, copied) in zip(module.named_modules(remove_duplicate=False),
                                         twin.named_modules(remove_duplicate=False)):
        copied._buffers.update(sharded._buffers)  # as FSDP2 placed them; statistics advance once
        _TWINS[sharded] = copied


def _twin(module: nn.Module) -> nn.Module:
    """A copy of `module` with empty (meta) parameters (`shard` gives it the module's buffers)."""
    twin = copy.deepcopy(module)
    for copied in twin.modules():
        for key, p in copied._parameters.items():
            if p is not None:
                copied._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                       requires_grad=p.requires_grad)
    return twin


def _local_of(value, param):
    """`value` (full, as for the unsharded parameter) as a shard like `param`'s."""
    if not isinstance(value, torch.Tensor) or value.shape != param.shape or value.dim() == 0:
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def twin(module: nn.Module) -> nn.Module | None:
    """The unsharded twin of a sharded module (or submodule), None for any other module."""
    return _TWINS.get(module) if _TWINS else None


def frozen(module: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered frozen parameters of a sharded module, which its twin runs with."""
    return {k: full(p) for k, p in module.named_parameters() if not p.requires_grad}


def full(tree):
    """`tree` (a tensor, or dicts, lists and tuples of them) with every DTensor gathered whole."""
    return _map_dtensors(lambda t: t.full_tensor(), tree)


def local(tree):
    """`tree` with every DTensor as this rank's local shard (a view, no communication)."""
    return _map_dtensors(lambda t: t.to_local(), tree)


def _map_dtensors(fn, tree):
    """`tree` with `fn` applied to each DTensor in it (dicts, lists and tuples walked)."""
    if isinstance(tree, dict):
        return {k: _map_dtensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_dtensors(fn, v) for v in tree)
    if isinstance(tree, torch.Tensor) and hasattr(tree, "device_mesh"):
        return fn(tree)
    return tree


def leaves(level) -> "shards.Shards":
    """The level's parameters as this rank's shards, new leaves that require grad."""
    return shards.Shards({k: p.to_local().detach().requires_grad_()
                          for k, p in level.named_parameters().items()})


def backward(loss: torch.Tensor, keep) -> None:
    """`loss.backward()`, through FSDP2's hooks (which reduce-scatter the sharded level's
    gradient), leaving the `.grad` of the tensors in `keep` (other levels' parameters the cost
    reads live) as it was."""
    saved = [(p, p.grad) for p in keep]
    for p in keep:  # (autograd would add into the kept tensor in place)
        p.grad = None
    loss.backward()
    for p, grad in saved:
        p.grad = grad


@contextlib.contextmanager
def calls(levels):
    """Yield the set that collects the names of the sharded levels among `levels` whose module
    itself is called in the block (in a functional pass, a call that bypasses the handle)."""
    called, hooks = set(), []
    for level in levels:
        if level.module in _TWINS:
            hooks.append(level.module.register_forward_pre_hook(
                lambda *_, name=level.name: called.add(name)))
    try:
        yield called
    finally:
        for hook in hooks:
            hook.remove()


def refuse(called: set, step: int, level) -> None:
    """Raise a `HandleError` if `level`'s cost called a sharded level's module itself (`calls`),
    where it reads that level through its handle, on gathered parameters: the sharded module
    runs on its own parameters, so the gradient to the gathered ones, and the hypergradient
    through that level, would be zero (with unsharded levels the two calls are the same)."""
    if called:
        name = min(called)
        raise HandleError(
            f"Program.step (step {step}): level '{level.name}' calls the network of sharded level "
            f"'{name}' directly instead of through the handle '{name}': the hypergradient of "
            f"'{level.name}' through '{name}' would be exactly zero.\n  {level.location}\n  Use "
            f"the handle in the cost: {name}(x).")


def saved(tree):
    """`tree` for a checkpoint: each DTensor as this rank's shard, `{SHARD: local, "shape": ...}`."""
    return _map_dtensors(lambda t: {SHARD: t.to_local(), "shape": list(t.shape),
                                    "dims": [getattr(p, "dim", -1) for p in t.placements]}, tree)


def loaded(tree, level):
    """`saved` output with each shard made a DTensor again, on `level`'s device mesh."""
    if isinstance(tree, dict) and SHARD in tree:
        from torch.distributed.tensor import DTensor, Replicate, Shard
        mesh = next((p.device_mesh for p in level.named_parameters().values()
                     if hasattr(p, "device_mesh")), None)
        if mesh is None:
            raise CheckpointError(f"Program.load_state_dict: level '{level.name}' was sharded "
                                  f"(shard=True) in the checkpoint but is not here; declare it "
                                  f"with shard=True, on as many ranks as it was saved from.")
        shape = torch.Size(tree["shape"])
        placements = [Shard(d) if d >= 0 else Replicate() for d in tree["dims"]]
        return DTensor.from_local(tree[SHARD], mesh, placements, run_check=False, shape=shape,
                                  stride=_contiguous_stride(shape))
    if isinstance(tree, dict):
        return {k: loaded(v, level) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(loaded(v, level) for v in tree)
    return tree


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))
