"""Shared pieces of the meta-learning tests: tiny float64 sinusoid tasks and an MLP."""

import torch
from torch import nn
from torch.func import functional_call

D = torch.float64
ALPHA, BETA, K = 0.3, 0.1, 3  # inner lr, outer lr, inner steps per task


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).to(D)


def make_tasks(n, seed=1):
    """n sinusoid tasks, each (support batch, query batch) of 6 points."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        amplitude = 0.5 + 2 * torch.rand(1, generator=g, dtype=D)
        phase = torch.rand(1, generator=g, dtype=D)
        points = [4 * torch.rand(6, 1, generator=g, dtype=D) - 2 for _ in range(2)]
        tasks.append(tuple((x, amplitude * torch.sin(x + phase)) for x in points))
    return tasks


def mse(model, params, batch):
    x, y = batch
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()



def mse_of(handle, batch):
    x, y = batch
    return ((handle(x) - y) ** 2).mean()


def run(program, tasks):
    for _ in range(len(tasks) * K):
        program.step()


def assert_params_close(module, expected, atol=1e-8):
    for key, p in module.named_parameters():
        assert torch.allclose(p.detach(), expected[key], atol=atol, rtol=0), key
