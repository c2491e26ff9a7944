"""Data parallelism on 2 CPU processes (gloo) equals one process with the concatenated batches."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
from mlo.data import Stream

STEPS, BATCH = 4, 6


def batches(seed, size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, size, 5, generator=g, dtype=torch.float64)
    return [(x[i], x[i] @ torch.linspace(0.1, 0.5, 5, dtype=torch.float64)[:, None]) for i in range(STEPS)]


def run_program(method, train, val):
    """Bilevel per-feature weight decay: the inner level fits, the outer learns the decay."""
    torch.manual_seed(0)
    net = nn.Linear(5, 1).double()
    decay = nn.Parameter(torch.zeros(5, dtype=torch.float64))

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.5),
               data=train, name="inner")
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x) - y) ** 2).mean() + (outer().exp() * module.params["weight"][0] ** 2).sum()

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.2), data=val, hypergrad=method,
               name="outer")
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    for _ in range(STEPS):
        program.step()
    return torch.cat([net.weight.detach().ravel(), net.bias.detach(), decay.detach()])


def shard(full, rank):
    return [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in full]


def worker(rank, world, init_file, methods, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for method in methods:
            train, val = batches(1, world * BATCH), batches(2, world * BATCH)
            result = run_program(method, shard(train, rank), shard(val, rank))
            torch.save(result, os.path.join(out_dir, f"{method}-{rank}.pt"))
        loader = DataLoader(TensorDataset(torch.arange(12)), batch_size=2, shuffle=True)
        stream = Stream(loader, "level")
        seen = [stream.next(0)[0] for _ in range(6)]  # two epochs of 3 batches on each rank
        torch.save(torch.cat(seen), os.path.join(out_dir, f"samples-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs gloo")
def test_two_ranks_equal_one_process_with_concatenated_batches(tmp_path):
    methods = ["aid_fd", "aid_cg"]
    mp.spawn(worker, args=(2, str(tmp_path / "init"), methods, str(tmp_path)), nprocs=2, join=True)
    for method in methods:
        single = run_program(method, batches(1, 2 * BATCH), batches(2, 2 * BATCH))
        ranks = [torch.load(tmp_path / f"{method}-{r}.pt", weights_only=True) for r in range(2)]
        assert torch.equal(ranks[0], ranks[1]), method  # every rank applied identical updates
        assert torch.allclose(ranks[0], single, atol=1e-6, rtol=0), method
        assert not torch.allclose(single[-5:], torch.zeros(5, dtype=torch.float64))

    samples = [torch.load(tmp_path / f"samples-{r}.pt", weights_only=True) for r in range(2)]
    for epoch in range(2):  # each epoch, the ranks see disjoint halves of the dataset
        halves = [s[epoch * 6:(epoch + 1) * 6] for s in samples]
        assert sorted(torch.cat(halves).tolist()) == list(range(12))
    assert not torch.equal(samples[0][:6], samples[0][6:])  # reshuffled by set_epoch
