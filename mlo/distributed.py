"""Data parallelism across processes: the only module that imports `torch.distributed`.

Under `torchrun` (or any initialized process group with more than one rank) a `Program`:

- broadcasts every level's parameters and buffers from rank 0 at construction, so all ranks start
  equal (as `DistributedDataParallel` does);
- shards map-style data: a `DataLoader` over a map-style dataset is rebuilt with a
  `DistributedSampler` (same batch size, collate function and workers; shuffling kept, seeded
  identically on every rank, `set_epoch` called at each restart). Iterable data (generators,
  lists of batches, `IterableDataset`) is left alone: give each rank its own shard;
- averages every level's gradient (direct + hypergradient) in one flat all-reduce per step;
- averages, inside a hypergradient, each vector that enters a best-response VJP and each
  Hessian-vector product of CG/Neumann, so that every rank computes the hypergradient of the
  global batch (the mean of the ranks' losses), exactly as one process with the concatenated
  batches would (up to floating-point summation order).

Gradients are reduced explicitly rather than through `DistributedDataParallel`'s backward hooks,
because hypergradients are computed with `torch.autograd.grad` and `torch.func` transforms, which
those hooks do not observe; one bucketed all-reduce per step gives the same averaging with no
reliance on hook order. ITD replays each rank's own recorded batches: under data parallelism its
hypergradient is the mean of the ranks' unrolls, not the unroll of the global batch.

Faults: a level step that raises on one rank ends the run on every rank (`guard`), promptly and
with a `DistributedError` naming the failed rank, the level and the step; a rank that dies or
hangs makes the others fail after the process group's timeout at most
(`init_process_group(timeout=...)`), never hang.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .errors import DistributedError

FAILURE_KEY = "mlo/failure"


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
    """Return the mean over ranks of a dict of tensors, in one flat all-reduce."""
    if world_size() == 1 or not tensors:
        return tensors
    keys = list(tensors)
    flat = torch.cat([tensors[k].reshape(-1) for k in keys])
    _collective(dist.all_reduce, flat)
    flat /= world_size()
    out, offset = {}, 0
    for k in keys:
        n = tensors[k].numel()
        out[k] = flat[offset:offset + n].view_as(tensors[k])
        offset += n
    return out


def average_grads(parameters) -> None:
    """Replace each parameter's `.grad` by its mean over ranks (one all-reduce).

    A parameter without a gradient on this rank contributes zeros, so that every rank reduces
    the same flat buffer.
    """
    params = list(parameters)
    grads = {i: p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(params)}
    for p, g in zip(params, average(grads).values()):
        p.grad = g.clone()


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
    either: the process group is gone. Cost: nothing unless a step raises.
    """
    if world_size() == 1:
        yield
        return
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
