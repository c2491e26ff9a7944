"""Passes on shards: a sharded level's hypergradient passes without its full parameters.

A sharded level (`shard=True`, `mlo.sharding`) holds 1/N of its parameters on each rank. The
passes that read it functionally (an upper level's direct gradient, `itd`'s replay,
`aid_cg`/`aid_neumann`'s Hessian-vector products, `aid_fd`/`sama`, frozen reads) run here on
this rank's shards, as FSDP2 runs the level's real steps:

- **Values** are `Shards`: a dict of this rank's local shards (plain tensors, rows of dim 0 as
  FSDP2 splits them), what a method differentiates and what its vectors (v, CG's iterates, the
  products) are made of. A method's vector arithmetic is elementwise on them; inner products
  (`dot`) add the ranks' parts.
- **The module** runs as its unsharded twin, each FSDP2 unit (a child of an `nn.Sequential` or
  `nn.ModuleList`, and the module itself for the rest) gathering its own parameters when it is
  called (`gather`, one all-gather per parameter) and dropping them when it returns. Where
  autograd saves a gathered parameter for a backward pass, it keeps the shard and gathers again
  when that pass reads it (`regathered`), as FSDP2 regathers a unit for its backward pass.
- **Gradients** to a shard come back reduce-scattered and averaged over ranks (`gather`'s
  backward pass): the gradient of the mean of the ranks' costs, the data-parallel gradient,
  with no further all-reduce. Its backward pass in turn gathers, so Hessian-vector products
  (a second backward pass) are the data-parallel mean too, and forward-mode tangents gather
  like values (`aid_fd`'s forward-over-reverse product). Parameters of the upper level
  (replicated) get each rank's part, averaged over ranks where data parallelism averages them.

Memory of a pass: the shards and shard-sized vectors, the parameters of one unit at a time,
and what autograd saves besides them (activations). A second-order backward pass reads a weight
twice, through the forward pass and through the first-order backward pass; autograd adds both
contributions up in a whole-sized buffer per weight, held until the pass comes back to the
layer, before the reduce-scatter (as an unsharded pass holds its gradient). The twin's
`nn.Linear`s avoid that (`_Linear`): their backward pass gathers the weight in a node of its
own, so each contribution is reduce-scattered when it arrives; other modules keep the buffer.

`itd` on shards replays the window's steps with the gradient each real step applied (the
ranks' mean): its hypergradient is that of the global batch's unroll, as in one process (and
as under unsharded data parallelism, `mlo.distributed.replicated`). Two passes
still gather the full parameters once (`mlo.sharding`): `itd` with a clipped update (its rule
takes the gradient's norm) and a pass in which a sharded level is itself differentiated against
(a source of a path).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import types

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Shards(dict):
    """The parameters in use of a sharded level, by name, as this rank's local shards."""


class Layout(NamedTuple):
    """How a parameter is split: rows of dim 0, `chunk` per rank (the last ones may hold less)."""

    group: object
    rows: int
    chunk: int
    world: int
    rank: int

    def local_rows(self) -> int:
        return max(0, min(self.chunk, self.rows - self.rank * self.chunk))


def layout(param) -> Layout:
    """The `Layout` of a DTensor parameter sharded by FSDP2 (`Shard(0)`)."""
    mesh = param.device_mesh
    world = mesh.size()
    rows = param.shape[0]
    return Layout(mesh.get_group(), rows, -(-rows // world), world, mesh.get_local_rank())


def _all_gather(part: torch.Tensor, at: Layout) -> torch.Tensor:
    with torch._C.DisableTorchFunction():  # collective plumbing, not an operation of the cost
        rows = part.shape[0]
        if rows < at.chunk:
            part = torch.cat([part, part.new_zeros((at.chunk - rows, *part.shape[1:]))])
        out = part.new_empty((at.chunk * at.world, *part.shape[1:]))
        dist.all_gather_into_tensor(out, part.contiguous(), group=at.group)
        return out[:at.rows]


def _reduce_scatter(whole: torch.Tensor, at: Layout) -> torch.Tensor:
    with torch._C.DisableTorchFunction():
        padding = at.chunk * at.world - at.rows
        if padding:
            whole = torch.cat([whole, whole.new_zeros((padding, *whole.shape[1:]))])
        out = whole.new_empty((at.chunk, *whole.shape[1:]))
        dist.reduce_scatter_tensor(out, whole.contiguous(), op=dist.ReduceOp.AVG, group=at.group)
        return out[:at.local_rows()]


class _Exchange(torch.autograd.Function):
    """Shard → whole parameter (an all-gather, `gathering`), or whole gradient → this rank's
    shard of the ranks' mean (a reduce-scatter); the backward pass of either is the other, and a
    tangent goes the way of the value."""

    @staticmethod
    def forward(ctx, tensor, at, gathering):
        ctx.at, ctx.gathering = at, gathering
        return (_all_gather if gathering else _reduce_scatter)(tensor, at)

    @staticmethod
    def backward(ctx, grad):
        return _Exchange.apply(grad, ctx.at, not ctx.gathering), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return (_all_gather if ctx.gathering else _reduce_scatter)(tangent, ctx.at)


def gather(part: torch.Tensor, at: Layout) -> torch.Tensor:
    """The whole parameter from this rank's shard `part` (an all-gather), differentiably: the
    gradient to `part` is the ranks' gradients averaged (reduce-scatter), a tangent of `part`
    gathers like its value. Where autograd saves it for a backward pass (under `regathered`),
    it keeps the shard and gathers again when the backward pass reads it."""
    return _remember(_Exchange.apply(part, at, True), part, at)


_SOURCES: dict = {}  # address of a gathered parameter's storage, while alive -> (shard, layout)


def _remember(whole: torch.Tensor, part, at) -> torch.Tensor:
    """Note that `whole`'s storage is `part` gathered, until that storage is freed (a storage's
    Python object lives exactly as long as the storage: autograd may keep the storage through
    another tensor object than `whole`)."""
    storage = whole.untyped_storage()
    key = storage.data_ptr()
    _SOURCES[key] = (part, at)
    weakref.finalize(storage, _SOURCES.pop, key, None)
    return whole


class _Shard:
    """A parameter kept as this rank's shard: pending in a slot of the twin until the unit that
    owns it is called, or saved for a backward pass (with the geometry of the saved view)."""

    __slots__ = ("part", "at", "geometry")

    def __init__(self, part, at, geometry=None):
        self.part, self.at, self.geometry = part, at, geometry


def _pack(tensor: torch.Tensor):
    try:
        source = _SOURCES.get(tensor.untyped_storage().data_ptr())
    except RuntimeError:  # no storage of its own
        return tensor
    if source is None or fwAD.unpack_dual(tensor).tangent is not None:
        return tensor  # (a dual tensor keeps its tangent: forward-over-reverse products)
    return _Shard(*source, (tensor.size(), tensor.stride(), tensor.storage_offset()))


def _unpack(packed) -> torch.Tensor:
    if not isinstance(packed, _Shard):
        return packed
    whole = _all_gather(packed.part.detach(), packed.at).as_strided(*packed.geometry)
    # autograd links it to its node again; saved again by a second-order pass, a shard again
    return _remember(whole, packed.part, packed.at)


def regathered():
    """Within this context, autograd saves a gathered parameter as its shard, and gathers it
    again when a backward pass reads it (as FSDP2 regathers a unit for its backward pass): a
    pass holds one unit's parameters at a time in its backward passes too, at the price of one
    more all-gather per unit and backward pass."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def whole(level, shards: dict) -> dict:
    """`shards` (this rank's parts of vectors shaped like `level`'s parameters) gathered whole."""
    params = level.named_parameters()
    with torch.no_grad():
        return {k: _all_gather(t, layout(params[k])) for k, t in shards.items()}


def part(level, tensors: dict) -> dict:
    """This rank's part of `tensors` (whole, shaped like `level`'s parameters)."""
    params = level.named_parameters()
    out = {}
    for k, t in tensors.items():
        at = layout(params[k])
        out[k] = t.narrow(0, at.rank * at.chunk, at.local_rows()).clone()
    return out


def dot(level):
    """The inner product of two dicts of `level`'s shards: the local products, summed over
    ranks (one all-reduce)."""
    group = layout(next(iter(level.named_parameters().values()))).group

    def inner_product(a: dict, b: dict) -> torch.Tensor:
        total = sum((a[k] * b[k]).sum() for k in a).detach().clone()
        dist.all_reduce(total, group=group)
        return total

    return inner_product


def tensors(sharded: nn.Module, twin: nn.Module, values: Shards, prefix: str, member: bool):
    """What the twin of `sharded` runs with, by name: the parameters in use (`values`) and the
    frozen ones, each a pending shard that its unit gathers when called (`units`), or gathered
    now where it is owned by a unit that contains `twin` (or where `member`: the call reads a
    property or method, which `functional_call` runs)."""
    below = _BELOW.get(twin, frozenset())
    out = {}
    for k, p in sharded.named_parameters():
        shard = values.get(k) if p.requires_grad else p.to_local()
        if shard is None:
            continue
        at = layout(p)
        out[prefix + k] = _Shard(shard, at) if k in below and not member else gather(shard, at)
    return out


_BELOW: "weakref.WeakKeyDictionary[nn.Module, frozenset]" = weakref.WeakKeyDictionary()
# twin module -> names (relative to it) of the parameters that it or units inside it gather


def units(twin: nn.Module, unit_paths: list[str]) -> None:
    """Make the twin's units gather their pending shards when called, and drop them after.

    `unit_paths` are the FSDP2 units by dotted path ("" for the module itself); a parameter
    belongs to the innermost unit containing it, as in FSDP2.
    """
    modules = dict(twin.named_modules(remove_duplicate=False))
    names = [name for name, _ in twin.named_parameters(remove_duplicate=False)]

    def inside(name: str, path: str) -> bool:
        return path == "" or name == path or name.startswith(path + ".")

    owner = {n: max((u for u in unit_paths if inside(n, u)), key=len) for n in names}
    for path, module in modules.items():
        _BELOW[module] = frozenset(n[len(path) + 1:] if path else n for n in names
                                   if inside(n, path) and inside(owner[n], path))
    for path in unit_paths:
        slots = []
        for n in names:
            if owner[n] == path:
                parent, _, key = n.rpartition(".")
                slots.append((modules[parent]._parameters, key))
        _install(modules[path], slots)
    for module in modules.values():
        if type(module) is nn.Linear:  # (a subclass may compute otherwise)
            module.forward = types.MethodType(_linear, module)


def _install(unit: nn.Module, slots: list) -> None:
    calls: list[list] = []  # per call in progress: the slots it filled

    def before(module, args):
        filled = []
        for store, key in slots:
            value = store.get(key)
            if isinstance(value, _Shard):
                store[key] = gather(value.part, value.at)
                filled.append((store, key, value))
        calls.append(filled)

    def after(module, args, output):
        for store, key, value in calls.pop() if calls else ():
            store[key] = value

    unit.register_forward_pre_hook(before)
    unit.register_forward_hook(after)


def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` of the twin: on the gathered weight and bias as usual, but
    differentiated through their shards (`_Linear`) where the unit gathered them."""
    weight, bias = _gathered(module.weight), _gathered(module.bias)
    if weight is None or (bias is None) != (module.bias is None) \
            or torch.is_autocast_enabled(x.device.type) or fwAD._current_level >= 0:
        return F.linear(x, module.weight, module.bias)
    (w_part, w_at), (b_part, b_at) = weight, bias or (None, None)
    return _Linear.apply(x, w_part, b_part, module.weight.detach(),
                         None if bias is None else module.bias.detach(), w_at, b_at)


def _gathered(tensor):
    """(shard, layout) of `tensor` if it is a whole parameter as `gather` returned it, else None."""
    if tensor is None or tensor.storage_offset() != 0 or not tensor.is_contiguous():
        return None
    source = _SOURCES.get(tensor.untyped_storage().data_ptr())
    if source is None or tensor.shape[0] != source[1].rows \
            or tensor.shape[1:] != source[0].shape[1:]:
        return None
    return source


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b, computed with the gathered W and b, differentiated as a function of their
    shards. Its backward pass gathers W again, in a node of its own: a second-order pass then
    reduce-scatters what reaches W through the first-order pass's x-gradient at once. Through
    the forward pass's gathered W (`gather`), autograd would add that to the forward pass's
    contribution in a whole-sized buffer per layer, held until the second-order pass comes back
    to the layer."""

    @staticmethod
    def forward(ctx, x, w_part, b_part, weight, bias, w_at, b_at):
        ctx.save_for_backward(x, w_part)
        ctx.at = w_at, b_at
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w_part = ctx.saved_tensors
        w_at, b_at = ctx.at
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ gather(w_part, w_at) if ctx.needs_input_grad[0] else None
        grad_w = _Exchange.apply(rows.t() @ x.reshape(-1, x.shape[-1]), w_at, False) \
            if ctx.needs_input_grad[1] else None
        grad_b = _Exchange.apply(rows.sum(0), b_at, False) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None
