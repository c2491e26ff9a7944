"""Data parallelism across processes (sharded levels: `mlo.sharding` and `mlo.shards`).

Under `torchrun` (or any initialized process group with more than one rank) a `Program`:

- broadcasts every level's parameters and buffers from rank 0 at construction, so all ranks start
  equal (as `DistributedDataParallel` does);
- shards map-style data: a `DataLoader` over a map-style dataset is rebuilt with a
  `DistributedSampler` (same batch size, collate function and workers; shuffling kept, seeded
  identically on every rank, `set_epoch` called at each restart). Iterable data (generators,
  lists of batches, `IterableDataset`) is left alone: give each rank its own shard;
- averages every level's direct gradient during its backward pass, bucket by bucket
  (`GradientReducer`: each bucket's all-reduce starts as soon as its gradients are computed, so
  communication overlaps the rest of the backward pass, as in `DistributedDataParallel`), and
  the upper levels' own hypergradient explicitly;
- averages, inside a hypergradient, each vector that enters a best-response VJP and each
  Hessian-vector product of CG/Neumann, so that every rank computes the hypergradient of the
  global batch (the mean of the ranks' losses), exactly as one process with the concatenated
  batches would (up to floating-point summation order).

The direct gradient is reduced by tensor hooks on the level's parameters rather than by wrapping
the module in `DistributedDataParallel`: a cost reaches its module through a handle (which may call
a submodule or a method, never the wrapper's forward) and the direct gradient is taken with
`torch.autograd.grad` together with the gradient to the lower levels' solutions; DDP's reducer
sees neither, tensor hooks see both. Hypergradient passes run on detached copies of the
parameters, which carry no hooks, and are averaged explicitly. ITD replays each rank's own
recorded batches, each step with the ranks' mean gradient as its real step took it
(`replicated`): its hypergradient is that of the global batch's unroll, as in one process.

A level declared `shard=True` is sharded with FSDP2 instead (`mlo.sharding`): its parameters
are broadcast before sharding, and FSDP2 reduce-scatters its gradient, so it has no
`GradientReducer`.

Faults: a level step that raises on one rank ends the run on every rank (`guard`), promptly and
with a `DistributedError` naming the failed rank, the level and the step; a rank that dies or
hangs makes the others fail after the process group's timeout at most
(`init_process_group(timeout=...)`), never hang.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .errors import DistributedError

FAILURE_KEY = "mlo/failure"
BUCKET_MB = 25.0  # a gradient bucket's size, as DistributedDataParallel's default bucket_cap_mb
FIRST_BUCKET_MB = 1.0  # smaller, so that communication starts early in the backward pass


class _Lost(DistributedError):
    """A collective failed: another rank closed its connection or did not answer in time."""


def world_size() -> int:
    """Return the number of ranks of the default process group (1 when none is initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Return this process's rank (0 when no process group is initialized)."""
    return dist.get_rank() if world_size() > 1 else 0


def smallest(value: int) -> int:
    """Return the smallest of `value` over ranks (`value` itself in one process)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    _collective(dist.all_reduce, tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def broadcast_level(level) -> None:
    """Make this rank's parameters and buffers of `level` equal to rank 0's."""
    tensors = list(level.named_parameters().values())
    if isinstance(level.module, torch.nn.Module):
        tensors += list(level.module.buffers())
    with torch.no_grad():
        for t in tensors:
            _collective(dist.broadcast, t.data, src=0)


def shard(data):
    """Return `data` with a `DistributedSampler` when it is a DataLoader over a map-style dataset."""
    if not isinstance(data, DataLoader) or not hasattr(data.dataset, "__getitem__") \
            or isinstance(data.sampler, DistributedSampler) or data.batch_sampler is None:
        return data
    sampler = DistributedSampler(data.dataset, shuffle=isinstance(data.sampler, RandomSampler),
                                 drop_last=data.drop_last)
    return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler,
                      num_workers=data.num_workers, collate_fn=data.collate_fn,
                      pin_memory=data.pin_memory, drop_last=data.drop_last)


def set_epoch(data, epoch: int) -> None:
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def average(tensors: dict) -> dict:
    """Average a dict of tensors over ranks, in place, and return it.

    The tensors are the caller's own (fresh gradients, products and vectors of a
    hypergradient), so no averaged copy is made beside them: they are packed into flat buffers
    of at most `BUCKET_MB` per all-reduce (one dtype and device each) and copied back, and a
    tensor of that size or more is reduced where it is. Extra memory: one bucket.
    """
    if world_size() == 1 or not tensors:
        return tensors
    seen, bucket, size = set(), [], 0
    limit = BUCKET_MB * 2 ** 20
    for key, t in tensors.items():
        if id(t) in seen:  # one tensor under two keys: averaged once, each key its own
            t = tensors[key] = t.clone()
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or (t.dtype, t.device) != (bucket[0].dtype,
                                                                        bucket[0].device)):
            _average_bucket(bucket)
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    _average_bucket(bucket)
    return tensors


def _average_bucket(bucket: list) -> None:
    with torch.no_grad():
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0]
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
        _collective(dist.all_reduce, flat)
        flat /= world_size()
        if flat is not bucket[0]:
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def replicated(tensors: dict) -> dict:
    """`tensors` (parameters every rank holds equal) as the input of this rank's cost, whose
    gradient is the ranks' mean: each is passed on as it is, and the gradient to it comes back
    all-reduced and averaged, differentiably (the gradient of that gradient is averaged too, so
    Hessian-vector products are the ranks' mean). A function of them, differentiated in the
    usual way, then has the data-parallel derivatives of the global batch: `itd` replays its
    window through it, so each replayed step takes the gradient the real step applied."""
    return {k: _Replicated.apply(t, False) for k, t in tensors.items()}


class _Replicated(torch.autograd.Function):
    """The identity, or (`averaging`) the mean over ranks; the backward pass of either is the
    other: a gradient to a replicated tensor is averaged, and a gradient to a mean is each
    rank's share of a later mean."""

    @staticmethod
    def forward(ctx, tensor, averaging):
        ctx.averaging = averaging
        if not averaging:
            return tensor.view_as(tensor)
        out = tensor.detach().clone()
        _collective(dist.all_reduce, out)
        return out.div_(world_size())

    @staticmethod
    def backward(ctx, grad):
        return _Replicated.apply(grad, not ctx.averaging), None


def average_grads(parameters) -> None:
    """Replace each parameter's `.grad` by its mean over ranks (all-reduced after the backward
    pass: the reference that `GradientReducer` overlaps with the backward pass).

    A parameter without a gradient on this rank contributes zeros, so that every rank reduces
    the same buffers.
    """
    params = list(parameters)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average({i: p.grad for i, p in enumerate(params)})


class GradientReducer:
    """Average a level's direct gradient over ranks while its backward pass runs, in buckets.

    Parameters are grouped, in reverse order of definition (the order a backward pass reaches
    them), into buckets of about `bucket_mb` MiB (default `BUCKET_MB`; the first, which the
    backward pass fills first, `FIRST_BUCKET_MB` at most) of one dtype and device.
    A hook on each parameter copies its gradient into its bucket when autograd computes it (by
    `.backward()` or `torch.autograd.grad`) and hands autograd the bucket's slice in its place, so
    the gradient autograd returns is that slice and its own copy is freed at once (one
    gradient-sized buffer per pass, not two); a full bucket starts its asynchronous all-reduce at
    once, so communication overlaps the rest of the backward pass. `reduced(grads)` waits for them (a
    bucket left incomplete, by a parameter that got no gradient, is completed with zeros and
    sent then) and returns the means, the same slices averaged in place. Buckets are allocated
    at each `arm()`, so gradients of earlier passes (accumulated micro-batches) are never
    overwritten. Hooks act only between `arm()` and `reduced()`: other
    passes that reach the live parameters (the handle check) send nothing. Every rank must send
    its buckets in the same order, which holds when the ranks run the same cost (the same
    contract as `DistributedDataParallel`). Cost: one all-reduce per bucket, of the gradient's size.

    Example::

        reducer = GradientReducer(level.named_parameters())
        reducer.arm()
        grads = reducer.reduced(torch.autograd.grad(loss, params, allow_unused=True))
    """

    def __init__(self, params: dict[str, torch.Tensor], bucket_mb: float | None = None):
        self._params = list(params.values())
        self._buckets: list[list[int]] = []
        self._bucket_of: dict[int, int] = {}
        self._offset_of: dict[int, int] = {}  # where a parameter's gradient starts in its bucket
        limit = (BUCKET_MB if bucket_mb is None else bucket_mb) * 2 ** 20
        size = 0
        for i in reversed(range(len(self._params))):
            p = self._params[i]
            previous = self._params[self._buckets[-1][0]] if self._buckets else None
            cap = min(limit, FIRST_BUCKET_MB * 2 ** 20) if len(self._buckets) == 1 else limit
            if previous is None or size >= cap or (p.dtype, p.device) != (previous.dtype,
                                                                           previous.device):
                self._buckets.append([])
                size = 0
            self._offset_of[i] = sum(self._params[j].numel() for j in self._buckets[-1])
            self._buckets[-1].append(i)
            self._bucket_of[i] = len(self._buckets) - 1
            size += p.numel() * p.element_size()
        this = weakref.ref(self)  # the parameters' hooks must not keep this reducer alive
        self._hooks = [p.register_hook(lambda grad, i=i: _on_grad(this, i, grad))
                       for i, p in enumerate(self._params)]
        self._armed = False
        self._grads: dict[int, torch.Tensor] = {}
        self._works: dict[int, tuple] = {}
        self._flats: list[torch.Tensor] = []

    def __del__(self):
        for hook in getattr(self, "_hooks", ()):  # a later Program's reducer replaces them
            hook.remove()

    def arm(self) -> None:
        """Start collecting: the next gradients of the parameters are reduced as they appear."""
        self._armed, self._grads, self._works = True, {}, {}
        self._pending = [len(bucket) for bucket in self._buckets]
        self._flats = []
        for bucket in self._buckets:
            first = self._params[bucket[0]]
            self._flats.append(torch.empty(sum(self._params[i].numel() for i in bucket),
                                           dtype=first.dtype, device=first.device))

    def _slice(self, index: int) -> torch.Tensor:
        """The view of `index`'s gradient in its bucket."""
        p, offset = self._params[index], self._offset_of[index]
        return self._flats[self._bucket_of[index]][offset:offset + p.numel()].view_as(p)

    def _ready(self, index: int, grad: torch.Tensor):
        """Copy a gradient into its bucket (sending a full bucket); return the bucket's view of
        it, which autograd passes on in its place (None: not collecting, or already have it)."""
        if not self._armed or index in self._grads:
            return None
        view = self._slice(index)
        view.copy_(grad.detach())
        self._grads[index] = view
        bucket = self._bucket_of[index]
        self._pending[bucket] -= 1
        if not self._pending[bucket]:
            self._send(bucket)
        return view

    def _send(self, bucket: int) -> None:
        for i in self._buckets[bucket]:
            if i not in self._grads:
                self._slice(i).zero_()
        flat = self._flats[bucket]
        self._works[bucket] = (flat, _collective(dist.all_reduce, flat, async_op=True))

    def reduced(self, grads) -> list:
        """Return the mean over ranks of `grads` (this rank's gradients, None where unused)."""
        for i, g in enumerate(grads):  # a gradient its hook missed (none is expected)
            if g is not None and i not in self._grads:
                self._ready(i, g)
        for bucket in range(len(self._buckets)):
            if bucket not in self._works:
                self._send(bucket)
        self._armed = False
        for bucket, (flat, work) in sorted(self._works.items()):
            _collective(work.wait)
            flat /= world_size()
        out = [self._slice(i) for i in range(len(self._params))]
        self._works, self._grads, self._flats = {}, {}, []  # hold no gradient past the step
        return out


def _on_grad(reducer, index: int, grad: torch.Tensor):
    alive = reducer()
    return alive._ready(index, grad) if alive is not None else None


def all_ranks(flag: bool) -> bool:
    """Return whether `flag` holds on every rank (so that all ranks skip an update together)."""
    return flag if world_size() == 1 else smallest(int(flag)) == 1


def _device() -> torch.device:
    """The device of the tensors that small collectives exchange (nccl only reduces CUDA ones)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(operation, *args, **kwargs):
    try:
        return operation(*args, **kwargs)
    except RuntimeError as error:  # gloo and nccl report a lost or timed-out peer this way
        raise _Lost(f"rank {rank()} of {world_size()} lost the other ranks in a collective "
                    f"({str(error).splitlines()[0]})") from error


@contextlib.contextmanager
def guard(step: int, level: str):
    """Turn a failure of one rank's level step into a `DistributedError` on every rank.

    The rank that raised notes its error in the process group's store and destroys its process
    group, which fails the collectives the other ranks wait in at once (rather than after the
    timeout); they read the note and raise naming that rank. The run cannot continue after
    either: the process group is gone. Cost: nothing unless a step raises. Entered only with
    more than one rank (`Program.step`).
    """
    where = f"Program.step (step {step}): level '{level}'"
    try:
        yield
    except _Lost as lost:
        note = _read_note()
        if note:
            raise DistributedError(f"{note}, so rank {rank()} stops too; see that rank's error "
                                   f"for the cause.") from None
        raise DistributedError(
            f"{where}: {lost}: a rank died, or waited longer than the process group's timeout; "
            f"see the other ranks' logs, or set init_process_group(timeout=...) to wait "
            f"longer.") from lost.__cause__
    except Exception as error:
        note = (f"{where} failed on rank {rank()} of {world_size()} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})")
        _write_note(note)
        dist.destroy_process_group()
        raise DistributedError(f"{note}; every rank stops. The original error is chained "
                               f"above.") from error


def _store():
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def _write_note(text: str) -> None:
    store = _store()
    if store is not None:
        with contextlib.suppress(RuntimeError):
            store.set(FAILURE_KEY, text)


def _read_note() -> str:
    store = _store()
    with contextlib.suppress(RuntimeError):
        if store is not None and store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode()
    return ""
