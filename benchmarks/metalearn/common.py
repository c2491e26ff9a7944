"""MAML on few-shot sinusoid regression, the same program for every implementation.

    task i:   y = A_i sin(x + b_i), A_i ~ U[0.1, 5], b_i ~ U[0, π], x ~ U[-5, 5];
              10 support and 10 query points;
    learner:  MLP 1-40-40-1 (ReLU), θ₀ = φ, 5 SGD steps (lr 0.01) on the support points;
    meta:     φ ← Adam(lr 1e-3) on (1/T) Σ_i ∇_φ MSE_query(θ_5^i(φ)), second order (MAML).

A meta step takes T tasks (the meta-batch); the runners cycle through the same `batches`
meta-batches in the same order. The evaluation loss is the mean query MSE of 20 held-out tasks
after 5 first-order adaptation steps from φ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class Config:
    method: str = "itd"               # itd: second-order MAML
    tasks: int = 4                    # T, tasks per meta step
    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    shots: int = 10
    hidden: int = 40
    batches: int = 8                  # distinct meta-batches, cycled
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


@lru_cache(maxsize=4)
def _initial(seed: int, hidden: int):
    torch.manual_seed(seed)
    return _mlp(hidden).state_dict()


def model(config: Config) -> nn.Module:
    """The meta-network φ with the program's initial parameters."""
    net = _mlp(config.hidden)
    net.load_state_dict(_initial(config.seed, config.hidden))
    return net.to(device=config.device, dtype=getattr(torch, config.dtype))


def _draw(n: int, shots: int, seed: int, dtype: str, device: str):
    g = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    phase = math.pi * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    x = 10 * torch.rand(n, 2 * shots, 1, generator=g, dtype=torch.float64) - 5
    y = amplitude * torch.sin(x + phase)
    x, y = (t.to(device=device, dtype=getattr(torch, dtype)) for t in (x, y))
    return [((x[i, :shots], y[i, :shots]), (x[i, shots:], y[i, shots:])) for i in range(n)]


@lru_cache(maxsize=8)
def _tasks(tasks: int, batches: int, shots: int, seed: int, dtype: str, device: str):
    return _draw(tasks * batches, shots, seed + 1, dtype, device)


def tasks(config: Config):
    """The training tasks in order: meta-batch j is tasks[j*T:(j+1)*T]."""
    return _tasks(config.tasks, config.batches, config.shots, config.seed, config.dtype,
                  config.device)


def mse(prediction, y):
    return F.mse_loss(prediction, y)


def evaluate(config: Config, net: nn.Module) -> float:
    """Mean query MSE of 20 held-out tasks after 5 first-order SGD steps from φ."""
    start = {k: p.detach() for k, p in net.named_parameters()}
    errors = []
    for (xs, ys), (xq, yq) in _draw(20, config.shots, 10_000 + config.seed, config.dtype,
                                     config.device):
        theta = {k: t.clone().requires_grad_() for k, t in start.items()}
        for _ in range(config.inner_steps):
            grads = torch.autograd.grad(mse(functional_call(net, theta, (xs,)), ys),
                                        list(theta.values()))
            theta = {k: (t - config.inner_lr * g).detach().requires_grad_()
                     for (k, t), g in zip(theta.items(), grads)}
        with torch.no_grad():
            errors.append(float(mse(functional_call(net, theta, (xq,)), yq)))
    return sum(errors) / len(errors)


class Runner:
    """What every implementation shares: the meta parameters φ (`net`), the meta-batches in
    their fixed order, φ's evaluation, and the parameters whose gradient the harness compares.
    Subclasses add `step()`."""

    def __init__(self, config: Config):
        self.config = config
        self.net = model(config)
        self._tasks, self._next = tasks(config), 0

    def next_meta_batch(self) -> list:
        """Return the next of the `batches` meta-batches of T tasks, cycling."""
        t = self.config.tasks
        batch = self._tasks[self._next * t:(self._next + 1) * t]
        self._next = (self._next + 1) % self.config.batches
        return batch

    def loss(self) -> float:
        return evaluate(self.config, self.net)

    def outer_params(self):
        return list(self.net.parameters())


def stacked(tasks_: list) -> tuple:
    """The support and query batches of a meta-batch with the tasks along a leading axis:
    ((xs, ys), (xq, yq)), each T × shots × 1 (task i at index i)."""
    def stack(batches):
        return tuple(torch.stack(parts) for parts in zip(*batches))
    return stack([s for s, _ in tasks_]), stack([q for _, q in tasks_])

