"""Handles: what a cost function receives for `module` and for each level it names."""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from . import rebind, sharding, shards
from .errors import HandleError


class Handle:
    """A level's module as one cost must see it: the module, run with the parameters in use.

    The parameters in use, `handle.params` (trainable parameters by name), are the module's live
    parameters in a real step, where calling the handle calls the module itself; in a hypergradient
    pass they are the tensors mlo differentiates with respect to, and the module runs functionally
    with them (`torch.func.functional_call`; frozen parameters and buffers come from the module,
    buffers copied so that running statistics are not advanced by these passes). A real step
    that records its graph (a live ITD window) runs functionally too, with `real=True`: there the
    module's own buffers are used, so running statistics advance as in any real step.

    Inside a cost a handle behaves like the module it stands for:

    - `handle(x)` runs the module's forward; `handle.encode(x)` and `handle.effective_weight`,
      a method or property of the module's own class, run with the parameters in use too;
    - `handle.weight` is the parameter in use; `handle.parameters()` and
      `handle.named_parameters()` yield the parameters in use (frozen ones from the module);
    - `handle.fc1`, `handle.layers[0]`, `for layer in handle.layers` give handles of submodules,
      holding their share of the parameters in use;
    - any other attribute comes from the module (`handle.training`, `handle.out_features`, a
      buffer), as do `nn.Module` methods other than the two above.

    The handle of a bare tensor level returns the tensor in use when called: `outer()`. A handle
    is not an `nn.Module` (no hooks to register, no `isinstance` match), and its own attribute
    `params` shadows a submodule or parameter of that name. Cost: a
    parameter is a dict lookup; a submodule's share is one pass over the parameters in use.
    A cost must reach a level's parameters through its handle only: calling the network object
    itself (`net(x)`) uses its live parameters, through which no hypergradient flows; `Program`
    checks this at the first hypergradient and raises a `HandleError`.

    Example::

        def inner(batch, module, outer):
            x, y = batch
            decay = outer().exp()                        # a tensor level: call its handle
            return F.mse_loss(module(x), y) + decay * module.weight.pow(2).sum()
    """

    __slots__ = ("_level", "_params", "_module", "_real")

    def __init__(self, level, params: dict[str, torch.Tensor] | None = None, module=None,
                 real: bool = False):
        self._level, self._params, self._real = level, params, real
        self._module = level.module if module is None else module

    @property
    def params(self) -> dict[str, torch.Tensor]:
        if isinstance(self._params, shards.Shards):  # a sharded level's, read by name: whole
            return {k: self._param(k) for k in self._params}
        if self._params is not None:
            return self._params
        if sharding.twin(self._module) is not None:
            raise _shards(self._level.name, "module.params")
        if self._module is self._level.module:
            return self._level.named_parameters()
        return {k: p for k, p in self._module.named_parameters() if p.requires_grad}

    def __call__(self, *args, **kwargs):
        module = self._module
        if isinstance(module, torch.Tensor):
            if args or kwargs:
                raise TypeError(f"level '{self._level.name}' is a tensor of hyperparameters; call "
                                f"its handle with no arguments to get it.")
            return module if self._params is None else self._params["param"]
        if self._params is not None:
            return _run(module, self._params, args, kwargs, self._real)
        if self._level.options.activation_checkpointing:
            # real steps only: in passes that differentiate twice the recomputed activations stay
            # in the second-order graph, so checkpointing there costs memory instead of saving it
            return _checkpointed(_live, module, None, args, kwargs)
        if self._level.options.compile is not False and module is self._level.module:
            return self._level.compiled()(*args, **kwargs)  # real steps only, as checkpointing
        return _live(module, None, args, kwargs)

    def __getattr__(self, name: str):
        if name in Handle.__slots__:  # not yet set (copy, unpickling): no module to ask
            raise AttributeError(name)
        module, params = self._module, self._params
        if isinstance(module, torch.Tensor):
            raise AttributeError(f"level '{self._level.name}' is a tensor of hyperparameters; "
                                 f"call its handle to get the tensor: {self._level.name}()."
                                 f"{name}")
        if params is not None:
            if name in params:
                return self._param(name)
            member = _member(type(module), name)
            if member == "property":  # a submodule it returns is viewed as any other
                return self._view(_run(_Member(module, name), params, (), {}, self._real))
            if member == "method":
                return lambda *args, **kwargs: _run(_Member(module, name, call=True), params,
                                                    args, kwargs, self._real)
        return self._view(getattr(module, name))

    def __getitem__(self, key):
        return self._view(self._module[key])

    def __iter__(self):
        return (self._view(item) for item in self._module)

    def __len__(self) -> int:
        return len(self._module)

    def __bool__(self) -> bool:
        return True  # as for a module: a handle is truthy even when its module has no len()

    def parameters(self):
        """Yield the module's parameters, the trainable ones as in use (like `nn.Module`'s)."""
        return (p for _, p in self.named_parameters())

    def named_parameters(self):
        """Yield `(name, parameter)` pairs of the module, the trainable ones as in use."""
        if isinstance(self._module, torch.Tensor):
            return iter(self.params.items())
        params = self.params
        return ((k, params.get(k, p)) for k, p in self._module.named_parameters())

    def _view(self, value):
        """Return `value`, reached from the module, as it is with the parameters in use."""
        if isinstance(value, nn.Module):
            return Handle(self._level, self._share(value), value, self._real)
        if self._params is None and isinstance(value, torch.Tensor) \
                and sharding.twin(self._module) is not None and hasattr(value, "device_mesh"):
            raise _shards(self._level.name, "a parameter of the module")
        if self._params is not None and isinstance(value, torch.Tensor):
            for key, p in self._module._parameters.items():
                if p is value:
                    return self._param(key) if key in self._params else value
        return value

    def _param(self, key: str) -> torch.Tensor:
        """The parameter in use named `key`; a sharded level's gathered whole (differentiably)."""
        value = self._params[key]
        if isinstance(self._params, shards.Shards):
            return shards.gather(value, shards.layout(dict(self._module.named_parameters())[key]))
        return value

    def _share(self, child: nn.Module) -> dict[str, torch.Tensor] | None:
        """Return the parameters in use of a submodule, keyed as the submodule names them."""
        if self._params is None:
            return None
        for key, module in self._module._modules.items():
            if module is child:
                prefix = key + "."
                return type(self._params)((k[len(prefix):], t) for k, t in self._params.items()
                                          if k.startswith(prefix))
        # reached otherwise (a slice of a Sequential, a property): match parameters by identity
        names = {id(p): k for k, p in self._module.named_parameters()}
        return type(self._params)((k, self._params[names[id(p)]])
                                  for k, p in child.named_parameters()
                                  if names.get(id(p)) in self._params)

    def __dir__(self):
        return sorted(set(dir(self._module)) | {"params", "parameters", "named_parameters"})

    def __repr__(self) -> str:
        if self._module is self._level.module:
            return f"<handle of level '{self._level.name}'>"
        return f"<handle of a {type(self._module).__name__} in level '{self._level.name}'>"


def _shards(level: str, what: str) -> HandleError:
    return HandleError(f"level '{level}' is sharded (shard=True): in its real steps its parameters "
                       f"are this rank's shards outside a call of its module, so {what} would "
                       f"compute with a shard. Reach them through calls of the module (or of a "
                       f"child of an nn.Sequential or nn.ModuleList in it, sharded on its own), "
                       f"or remove shard=True.")


@functools.lru_cache(maxsize=None)
def _member(cls: type, name: str) -> str | None:
    """Return "method" or "property" for a member of a module's own class (not of `nn.Module`,
    whose API, `train()` or `state_dict()`, stays the module's), else None."""
    if hasattr(nn.Module, name) and name != "forward":
        return None
    member = inspect.getattr_static(cls, name, None)
    return "property" if isinstance(member, property) else \
        "method" if inspect.isfunction(member) else None


class _Member(nn.Module):
    """Read (or call) one member of a module as a forward, so that `functional_call` can run it
    with other parameters."""

    def __init__(self, module: nn.Module, name: str, call: bool = False):
        super().__init__()
        self.module, self.name, self.call = module, name, call

    def forward(self, *args, **kwargs):
        value = getattr(self.module, self.name)
        return value(*args, **kwargs) if self.call else value


def _checkpointed(run, module: nn.Module, params, args, kwargs):
    """Run `module` storing only each segment's input; the backward pass recomputes the rest.

    An `nn.Sequential` of n children called with one input is split into segments of ⌈√n⌉
    consecutive children: about √n stored inputs plus one segment's activations at a time, in
    place of all n (the classic O(√n) schedule); any other module is one segment. Each segment's
    parameters in use are inputs of its checkpoint, so a recomputation uses the same tensors as
    the forward pass (and random draws are replayed).
    """
    if not (isinstance(module, nn.Sequential) and len(args) == 1 and not kwargs):
        return checkpoint(run, module, params, args, kwargs, use_reentrant=False)
    keys, x = list(module._modules), args[0]
    size = math.ceil(math.sqrt(len(keys)))
    for start in range(0, len(keys), size):
        segment = nn.Sequential(OrderedDict((k, module._modules[k]) for k in keys[start:start + size]))
        share = None if params is None else \
            {k: t for k, t in params.items() if k.split(".", 1)[0] in segment._modules}
        x = checkpoint(run, segment, share, (x,), {}, use_reentrant=False)
    return x


def _live(module: nn.Module, params: None, args, kwargs):
    return module(*args, **kwargs)


def _run(module: nn.Module, params: dict, args, kwargs, real: bool = False):
    """Call `module` functionally with `params`. Buffers are passed as copies, except in a `real`
    step: a functional pass (a hypergradient) must not advance BatchNorm's running statistics,
    and torch.func transforms allow the in-place update only on copies."""
    member = isinstance(module, _Member)
    inner, prefix = (module.module, "module.") if member else (module, "")
    twin = sharding.twin(inner)
    if isinstance(params, shards.Shards):  # each unit of the twin gathers its own shards
        tensors = shards.tensors(inner, twin, params, prefix, member)
    else:
        tensors = {prefix + k: t for k, t in params.items()}
    if not real:
        tensors.update({prefix + k: b.clone() for k, b in inner.named_buffers()})
    if twin is not None:  # FSDP2's hooks would run the sharded module on its own parameters
        if not isinstance(params, shards.Shards):
            tensors.update({prefix + k: t for k, t in sharding.frozen(inner).items()})
        module = _Member(twin, module.name, module.call) if member else twin
    if isinstance(params, shards.Shards):
        with shards.regathered():
            return _call(module, tensors, args, kwargs)
    return _call(module, tensors, args, kwargs)


def _call(module: nn.Module, tensors: dict, args, kwargs):
    if isinstance(module, _Member):
        return functional_call(module, tensors, args, kwargs, strict=False)
    return rebind.call(module, tensors, args, kwargs)
