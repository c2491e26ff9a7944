"""Sharded levels (FSDP2) on 2 forked CPU processes (gloo): parameters, gradients and optimizer
state are shards, and every method's program equals one process with the concatenated batches;
checkpoints of a sharded program resume exactly; wrong uses fail early."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
from test_distributed import forked

STEPS, BATCH = 4, 6
METHODS = ("itd", "aid_cg", "aid_neumann", "aid_fd", "sama")
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(os, "fork"),
                                reason="needs gloo and fork")


def batches(seed, size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, size, 5, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.linspace(-0.5, 0.5, 5, dtype=torch.float64)[:, None])
    return [(x[i], y[i]) for i in range(STEPS)]


def shard(full, rank):
    return [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in full]


def run_program(method, train, val):
    """An MLP inner level (sharded) fits inputs rescaled by the outer level, which learns the
    per-feature scales from validation data."""
    mlo.registry.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    scales = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05) if method == "sama" \
        else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)

    @mlo.level(module=net, optimizer=optimizer, data=train, shard=True, name="inner")
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x * outer().exp()) - y) ** 2).mean()

    @mlo.level(module=scales, optimizer=torch.optim.SGD([scales], lr=0.5), data=val,
               hypergrad=method, name="outer")
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    for _ in range(STEPS):
        program.step()
    kinds = {type(p).__name__ for p in net.parameters()}
    kinds |= {type(s).__name__ for state in optimizer.state.values() for s in state.values()
              if s.dim() > 0}
    with torch.no_grad():  # the sharded net through its own hooks, on fresh inputs
        outputs = net(torch.ones(3, 5, dtype=torch.float64)).ravel()
    params = torch.cat([_full(p).ravel() for p in net.parameters()] + [scales.detach()])
    return {"params": params, "outputs": outputs, "kinds": sorted(kinds)}


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def sharded_runs(rank):
    train, val = batches(1, 2 * BATCH), batches(2, 2 * BATCH)
    return {method: run_program(method, shard(train, rank), shard(val, rank)) for method in METHODS}


def test_a_sharded_level_equals_one_process_with_concatenated_batches_for_every_method(tmp_path):
    results = forked(sharded_runs, tmp_path, timeout=60.0)
    for method in METHODS:
        single = run_program(method, batches(1, 2 * BATCH), batches(2, 2 * BATCH))
        ranks = [result[method] for result in results]
        assert ranks[0]["kinds"] == ["DTensor"], method  # parameters and optimizer state: shards
        assert single["kinds"] == ["Parameter", "Tensor"]  # one process: shard=True does nothing
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), method
        assert torch.allclose(ranks[0]["params"], single["params"], atol=1e-6, rtol=0), method
        assert torch.allclose(ranks[0]["outputs"], single["outputs"], atol=1e-6, rtol=0), method
        assert not torch.allclose(single["params"][-5:], torch.zeros(5, dtype=torch.float64))
