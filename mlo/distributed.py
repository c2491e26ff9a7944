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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


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
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def broadcast_level(level) -> None:
    """Make this rank's parameters and buffers of `level` equal to rank 0's."""
    tensors = list(level.named_parameters().values())
    if isinstance(level.module, torch.nn.Module):
        tensors += list(level.module.buffers())
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


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
    dist.all_reduce(flat)
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
