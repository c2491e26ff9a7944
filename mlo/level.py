"""`@mlo.level`: turn a cost function into a `Level`, checking the declaration at decoration time."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .checks import check_data_length, check_trainable
from .errors import LevelError, OptimizerError, closest, quoted, where
from .graph import Node
from .hypergrad import Method, resolve
from .sharding import is_fsdp

RESERVED = ("batch", "module")


class Upper:
    """Annotation for a named level that is *above* this one: its current parameters enter this cost.

    Needed only when both levels of a pair declare `hypergrad`::

        def mid(batch, module, top: mlo.Upper, low): ...
    """


class Lower:
    """Annotation for a named level that is *below* this one: its solution enters this cost."""


class Init:
    """Annotation for a named upper level whose parameters this level starts each unroll window from.

    `def adapt(batch, module, meta: mlo.Init)` resets `adapt`'s parameters to `meta`'s (θ₀ = φ),
    and clears `adapt`'s optimizer state, before its first step and before its first step after
    each step of `meta`; `meta` must read `adapt`'s solution. See `mlo.meta` for MAML, FOMAML,
    iMAML, Reptile and Meta-SGD written with it.
    """


@dataclass(frozen=True)
class Options:
    """The per-level settings of `@mlo.level`, validated once at decoration time."""

    unroll: int = 1
    warmup: int = 0
    grad_accum: int = 1
    clip_grad: float | None = None
    fp16: bool = False
    bf16: bool = False
    scheduler: Any = None
    tasks: int = 1
    vmap: bool = False
    activation_checkpointing: bool = False
    compile: Any = False
    shard: bool = False


class Level:
    """One level of a multilevel program: a cost function, its parameters, optimizer and data.

    Calling a level outside a program, `classifier(x)`, is calling its module, `net(x)`, with its
    current parameters: it trains nothing and, as any module call, records an autograd graph
    unless grad mode is off. To evaluate a trained level, call it under `torch.no_grad()` (or
    `torch.inference_mode()`): its outputs then carry no graph (`requires_grad` is False) and hold
    no activations. A bare hyperparameter tensor level returns its tensor: the parameter itself,
    or under no_grad a detached view of it (`.clone()` it to keep a snapshot across steps).
    Train/eval mode is the module's own: `classifier.module.eval()` before evaluating dropout or
    batch norm.

    Example::

        with torch.no_grad():
            accuracy = (classifier(x_test).argmax(1) == y_test).float().mean()
    """

    def __init__(self, fn: Callable, module, optimizer, data, hypergrad, name: str, options: Options):
        self.fn, self.module, self.optimizer, self.data = fn, module, optimizer, data
        self.name, self.options = name, options
        self._params: dict[str, torch.Tensor] | None = None
        self._compiled = None
        self.method: Method | None = resolve(hypergrad, name)
        self.location = where(fn)
        self.names, self.uses_batch, self.uses_module = _parse_signature(fn, name, self.location)

    @property
    def node(self) -> Node:
        return Node(self.name, self.method is not None, self.names, self.location)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Return this level's trainable parameters by name (a bare tensor is named 'param').

        Read once and cached; building a `Program` reads them again (`refresh`), so parameters
        frozen or added after that take effect at the next `Program(...)`.
        """
        if self._params is None:
            self.refresh()
        return self._params

    def compiled(self):
        """The module compiled with `torch.compile(module, **options)` (built at first use), for
        the level's real steps; see `@mlo.level(compile=...)`."""
        if self._compiled is None:
            options = {} if self.options.compile is True else dict(self.options.compile)
            self._compiled = torch.compile(self.module, **options)
        return self._compiled

    def refresh(self) -> None:
        """Re-read the module's trainable parameters."""
        if isinstance(self.module, torch.Tensor):
            self._params = {"param": self.module}
        else:
            self._params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def __call__(self, *args, **kwargs):
        if isinstance(self.module, torch.Tensor):
            if args or kwargs:
                raise TypeError(f"level '{self.name}' is a tensor of hyperparameters; call it "
                                f"with no arguments to get it.")
            return self.module if torch.is_grad_enabled() else self.module.detach()
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        method = f", hypergrad={self.method!r}" if self.method else ""
        return f"<mlo level '{self.name}'{method}>"


def level(*, module, optimizer, data=None, hypergrad=None, unroll: int = 1, fp16: bool = False,
          bf16: bool = False, scheduler=None, grad_accum: int = 1, clip_grad: float | None = None,
          warmup: int = 0, tasks: int = 1, vmap: bool = False,
          activation_checkpointing: bool = False, compile=False, shard: bool = False,
          name: str | None = None):
    """Declare a level of a multilevel program; its signature names the levels it depends on.

    The decorated function is the level's cost. Its parameters are `batch` (this level's current
    batch), `module` (this level's module, run with its current parameters) and the names of other
    levels, each received as a handle that runs that level's module as this level must see it
    (`mlo.handle.Handle`: it also gives `module.weight`, submodules and methods as in use).
    The level is recorded in `mlo.registry` under its name, replacing any earlier level of that name.
    `tasks=T` makes one optimizer step of this level average T windows of the levels it reads (a
    meta-batch of T tasks, see `mlo.meta`); with `vmap=True` the T tasks run side by side along
    a leading task axis of every batch, vectorised with `torch.func.vmap` (`mlo.task_axis`).

    `data` yields whole batches: a tensor or a map-style `Dataset`, which yield single examples,
    are refused (wrap them in a `DataLoader`). `fp16=True` is meant for GPUs: on CPU float16
    autocast runs, usually slower than float32, and `Program` warns once; use `bf16=True` there.

    `activation_checkpointing=True` runs every call of the module (or a submodule) through its
    handles in real steps under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`:
    activations are recomputed during the backward pass instead of stored, for about one more
    forward pass per backward pass, with unchanged gradients (random draws such as dropout are
    replayed). An `nn.Sequential` of n children runs as √n segments, so its stored activations
    grow with √n, not n; any other module is one segment, which saves memory only between its
    forward and backward passes. Hypergradient passes (`itd`, `aid_cg`, `aid_neumann`, `aid_fd`,
    `sama`) run unchecked: they differentiate twice, and the recomputed activations then stay in
    the second-order graph (measured with checkpointing there too: +5-10% peak for those
    passes; real steps: -47% peak tensor memory; benchmarks/results/activation_memory.md). Methods
    reached as `module.encode(x)` run unchecked. A BatchNorm
    module in training mode advances its running statistics again when recomputed, as in PyTorch.
    A level that an `itd` upper level differentiates has its steps replayed at that level's step
    when it is checkpointed, not recorded during its real steps (`mlo.live`): recording keeps
    each step's graph, which checkpointing is meant to avoid.

    `compile=True` (or a dict of `torch.compile` options, e.g. `{"mode": "reduce-overhead"}` for
    CUDA graphs on a GPU) runs the module compiled by `torch.compile` wherever a real step calls
    it directly: the level's own forward and backward pass, and its forward inside the cost of a
    level that reads it. Hypergradient passes and real steps that record an ITD unroll run it
    uncompiled: they differentiate twice, which compiled graphs do not support. The compiled
    module is built at its first call (compilation takes seconds there). On CPU compiled steps
    were measured slower than eager ones (`python -m benchmarks.compile`); it is meant for GPUs.

    `shard=True` keeps the module's parameters, gradients and optimizer state sharded across the
    ranks with FSDP2 (`fully_shard`, applied by `Program` under a process group of more than one
    rank; with one process it changes nothing). Its real steps gather one unit (a child of an
    `nn.Sequential` / `nn.ModuleList`) at a time, and so do other levels' steps and
    hypergradients that read it, on this rank's shards (`mlo.shards`; `itd` with `clip_grad`
    gathers its full parameters for the pass, `mlo.sharding`). Pass the unsharded module
    and its optimizer: mlo moves the optimizer onto the shards. In its own cost, reach its
    parameters through calls of `module` (outside a forward they are this rank's shards). A
    sharded level declares no hypergrad, and sets none of fp16, compile and
    activation_checkpointing.

    Example::

        @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=loader)
        def classifier(batch, module, weighting):
            x, y = batch
            loss = F.cross_entropy(module(x), y, reduction="none")
            return (weighting(loss.detach()[:, None]).squeeze(1) * loss).mean()
    """
    options = Options(unroll=unroll, warmup=warmup, grad_accum=grad_accum, clip_grad=clip_grad,
                      fp16=fp16, bf16=bf16, scheduler=scheduler, tasks=tasks, vmap=vmap,
                      activation_checkpointing=activation_checkpointing, compile=compile,
                      shard=shard)

    def decorate(fn: Callable) -> Level:
        if isinstance(fn, Level) or not callable(fn):
            got = repr(fn) if isinstance(fn, Level) else type(fn).__name__
            raise LevelError(f"@level: expected a function to decorate, got {got}; apply "
                             f"@mlo.level(...) once, to the cost function itself.")
        level_name = name if name is not None else getattr(fn, "__name__", None)
        if level_name is None:
            raise LevelError(f"@level: {type(fn).__name__} objects have no __name__; pass "
                             f"name=... to @mlo.level.")
        _check_shard(level_name, module, hypergrad, options)
        _check_options(level_name, module, optimizer, data, options)
        new = Level(fn, module, optimizer, data, hypergrad, level_name, options)
        if options.shard and any(kind == "init" for _, kind in new.names):
            raise LevelError(f"@level '{level_name}': shard=True on a level that starts from "
                             f"another (mlo.Init) is not supported; remove one of the two.\n"
                             f"  {new.location}")
        registry.add(new)
        return new

    return decorate


def _check_options(name: str, module, optimizer, data, options: Options) -> None:
    prefix = f"@level '{name}':"
    if not isinstance(name, str) or not name.isidentifier():
        raise LevelError(f"@level: name must be a Python identifier, got {name!r}.")
    if not isinstance(module, (nn.Module, torch.Tensor)):
        raise LevelError(f"{prefix} module must be an nn.Module or a tensor of hyperparameters, "
                         f"got {type(module).__name__}.")
    if isinstance(module, torch.Tensor) and not module.requires_grad:
        raise LevelError(f"{prefix} the module tensor does not require grad, so it cannot be "
                         f"trained. Wrap it in nn.Parameter(...) or call .requires_grad_().")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LevelError(f"{prefix} optimizer must be a torch.optim.Optimizer over the module's "
                         f"parameters, got {type(optimizer).__name__}.")
    check_trainable(prefix, module, optimizer)
    _check_coverage(prefix, module, optimizer)
    _check_data(prefix, data)
    for key in ("unroll", "grad_accum", "tasks"):
        _check_int(prefix, key, getattr(options, key), minimum=1)
    check_data_length(prefix, data, options.grad_accum)
    _check_int(prefix, "warmup", options.warmup, minimum=0)
    if options.clip_grad is not None and (isinstance(options.clip_grad, bool) or not (
            isinstance(options.clip_grad, (int, float)) and options.clip_grad > 0)):
        raise LevelError(f"{prefix} clip_grad must be a positive max norm or None, "
                         f"got {options.clip_grad!r}.")
    for key in ("fp16", "bf16", "vmap", "activation_checkpointing"):
        if not isinstance(getattr(options, key), bool):
            raise LevelError(f"{prefix} {key} must be True or False, got {getattr(options, key)!r}.")
    if options.activation_checkpointing and isinstance(module, torch.Tensor):
        raise LevelError(f"{prefix} activation_checkpointing=True needs an nn.Module, but the "
                         f"module is a tensor of hyperparameters, with no activations to "
                         f"recompute; remove the option.")
    if not isinstance(options.compile, (bool, dict)):
        raise LevelError(f"{prefix} compile must be True, False or a dict of torch.compile "
                         f"options, got {options.compile!r}.")
    if options.compile is not False and isinstance(module, torch.Tensor):
        raise LevelError(f"{prefix} compile needs an nn.Module, but the module is a tensor of "
                         f"hyperparameters, with no forward to compile; remove the option.")
    if options.compile is not False and options.activation_checkpointing:
        raise LevelError(f"{prefix} compile and activation_checkpointing are both set; choose "
                         f"one (checkpointing a compiled module is not supported here).")
    if options.vmap and options.tasks == 1:
        raise LevelError(f"{prefix} vmap=True runs the tasks of a meta-batch side by side, but "
                         f"tasks=1; set tasks=T (the meta-batch size) too, or remove vmap=True.")
    if options.fp16 and options.bf16:
        raise LevelError(f"{prefix} fp16 and bf16 are both set; choose one precision.")
    if options.scheduler is not None and not callable(getattr(options.scheduler, "step", None)):
        raise LevelError(f"{prefix} scheduler must be a torch.optim.lr_scheduler object (with a "
                         f".step() method), got {type(options.scheduler).__name__}.")
    if options.scheduler is not None and getattr(options.scheduler, "optimizer", optimizer) \
            is not optimizer:
        raise LevelError(f"{prefix} the scheduler drives another optimizer; build it on this "
                         f"level's optimizer.")


def _check_shard(name: str, module, hypergrad, options: Options) -> None:
    """Refuse what a sharded level does not support, and a module sharded before mlo saw it."""
    prefix = f"@level '{name}':"
    if is_fsdp(module):
        raise LevelError(f"{prefix} the module is already sharded by fully_shard; pass the "
                         f"unsharded module (and an optimizer over its parameters) with "
                         f"shard=True: Program shards it and keeps an unsharded twin for "
                         f"hypergradient passes.")
    if not isinstance(options.shard, bool):
        raise LevelError(f"{prefix} shard must be True or False, got {options.shard!r}.")
    if not options.shard:
        return
    if isinstance(module, torch.Tensor):
        raise LevelError(f"{prefix} shard=True needs an nn.Module, but the module is a tensor of "
                         f"hyperparameters; remove the option (a tensor is not sharded).")
    if hypergrad is not None:
        raise LevelError(f"{prefix} shard=True with hypergrad={hypergrad!r}: a sharded level "
                         f"cannot have a hypergradient of its own; shard the lower levels it "
                         f"reads, or remove shard=True here.")
    for key in ("fp16", "compile", "activation_checkpointing"):
        if getattr(options, key):
            raise LevelError(f"{prefix} shard=True with {key}={getattr(options, key)!r} is not "
                             f"supported; remove one of the two options.")


def _check_data(prefix: str, data) -> None:
    """Require an iterable of batches; refuse what iterates one example at a time."""
    if isinstance(data, torch.Tensor):
        raise LevelError(f"{prefix} data is a tensor of shape {tuple(data.shape)}, whose batches "
                         f"would be its single rows; pass an iterable of batches: a list such as "
                         f"[(x, y)], or DataLoader(TensorDataset(x, y), batch_size=...).")
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise LevelError(f"{prefix} data is a {type(data).__name__}, whose items are single "
                         f"examples, not batches; pass DataLoader(dataset, batch_size=...).")
    if data is not None and not hasattr(data, "__iter__"):
        raise LevelError(f"{prefix} data must be an iterable of batches (e.g. a DataLoader) or "
                         f"None, got {type(data).__name__}.")


def _check_int(prefix: str, key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LevelError(f"{prefix} {key} must be an integer >= {minimum}, got {value!r}.")


def _check_coverage(prefix: str, module, optimizer) -> None:
    """Require the optimizer to hold exactly the module's trainable parameters."""
    if isinstance(module, torch.Tensor):
        trainable = {id(module): "the module tensor"}
    else:
        trainable = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for i, n in trainable.items() if i not in held]
    if missing:
        raise OptimizerError(
            f"{prefix} the optimizer does not cover the module's trainable parameters "
            f"{quoted(missing[:5])}{' ...' if len(missing) > 5 else ''}; build it from "
            f"module.parameters(), or set requires_grad=False on parameters to freeze.")
    foreign = len(held - set(trainable))
    if foreign:
        raise OptimizerError(
            f"{prefix} the optimizer holds {foreign} parameter(s) that are not trainable parameters "
            f"of this level's module (another module's, or frozen ones); each level's optimizer "
            f"must hold only its own module's parameters.")


def _parse_signature(fn: Callable, name: str, location: str):
    """Return (named levels with annotations, uses batch, uses module) from the signature."""
    names, uses = [], set()
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise LevelError(
                f"@level '{name}': *args / **kwargs are not allowed: each parameter must name "
                f"'batch', 'module' or another level.\n  {location}")
        if param.kind is param.POSITIONAL_ONLY:
            raise LevelError(f"@level '{name}': parameter '{param.name}' is positional-only; "
                             f"levels are passed by name, remove the '/'.\n  {location}")
        if param.default is not param.empty:
            continue  # defaults are never injected: they configure the function itself
        if param.name in RESERVED:
            uses.add(param.name)
        else:
            names.append((param.name, _direction(param.annotation, name, param.name)))
    return tuple(names), "batch" in uses, "module" in uses


def _direction(annotation, name: str, parameter: str) -> str | None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if annotation is inspect.Parameter.empty:
        return None
    if annotation is Upper or text.split(".")[-1] == "Upper":
        return "upper"
    if annotation is Lower or text.split(".")[-1] == "Lower":
        return "lower"
    if annotation is Init or text.split(".")[-1] == "Init":
        return "init"
    raise LevelError(f"@level '{name}': parameter '{parameter}' has annotation {annotation!r}; "
                     f"only mlo.Upper or mlo.Lower or mlo.Init may annotate a level parameter.")


class Registry:
    """The default registry: levels by name, the newest definition of each name wins."""

    def __init__(self):
        self._levels: dict[str, Level] = {}

    def add(self, new: Level) -> None:
        self._levels.pop(new.name, None)  # re-insert so a redefined level keeps definition order
        self._levels[new.name] = new

    def levels(self) -> list[Level]:
        return list(self._levels.values())

    def clear(self) -> None:
        self._levels.clear()

    def __getitem__(self, name: str) -> Level:
        if name not in self._levels:
            raise KeyError(f"mlo.registry: no level named '{name}'; levels: "
                           f"{quoted(self._levels)}.{closest(name, self._levels)}")
        return self._levels[name]

    def __contains__(self, name: str) -> bool:
        return name in self._levels

    def __len__(self) -> int:
        return len(self._levels)

    def __repr__(self) -> str:
        return f"<mlo registry: {quoted(self._levels)}>"


registry = Registry()
