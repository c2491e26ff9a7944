"""Per-feature weight-decay logistic regression: the program every implementation computes.

Lower level (weights w ∈ R^d) minimises, on the full training set,

    f(w, λ) = mean_i BCE(x_iᵀw, y_i) + ½ Σ_j exp(λ_j) w_j²

Upper level (log weight decays λ ∈ R^d) minimises the validation loss F(w*(λ)) = mean BCE on the
validation set. Per outer step w takes `unroll` full-batch SGD steps (lr `inner_lr`), warm-started
from where it stopped, then λ takes one step (Adam, lr `outer_lr`) on the hypergradient of F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    method: str = "aid_cg"            # aid_fd | aid_fd_central | aid_cg | aid_neumann | itd
    unroll: int = 100
    features: int = 100
    samples: int = 1000               # training and validation set sizes
    iters: int = 10                   # CG / Neumann iterations
    inner_lr: float = 0.1             # SGD on w; also ξ of aid_fd and α of aid_neumann
    outer_lr: float = 0.05            # Adam on λ
    outer_optimizer: str = "adam"     # adam | sgd
    r: float = 0.01                   # aid_fd_central radius: ε = r / ‖v‖
    initial_decay: float = 1e-2       # exp(λ) at the start
    seed: int = 0
    device: str = "cpu"


class LogisticRegression(nn.Module):
    """x ↦ x w (logits), with w the only parameter, initialised at zero."""

    def __init__(self, features: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        return x @ self.w


class LogDecay(nn.Module):
    """The upper level's parameters λ as a module whose forward returns them."""

    def __init__(self, lam: torch.Tensor):
        super().__init__()
        self.lam = nn.Parameter(lam)

    def forward(self):
        return self.lam


def model(config: Config) -> LogisticRegression:
    return LogisticRegression(config.features).to(config.device)


def initial_lam(config: Config) -> torch.Tensor:
    return torch.full((config.features,), math.log(config.initial_decay), device=config.device)


@lru_cache(maxsize=4)
def _data(seed: int, features: int, samples: int, device: str):
    g = torch.Generator().manual_seed(seed + 1)
    truth = 3 * torch.randn(features, generator=g) / math.sqrt(features)

    def draw():
        x = torch.randn(samples, features, generator=g)
        y = torch.bernoulli(torch.sigmoid(x @ truth), generator=g)
        return x.to(device), y.to(device)

    return draw(), draw()


def data(config: Config):
    """((X_train, y_train), (X_val, y_val)), identical for every implementation."""
    return _data(config.seed, config.features, config.samples, config.device)


def inner_cost(w, lam, x, y):
    return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (torch.exp(lam) * w * w).sum()


def outer_cost(w, x, y):
    return F.binary_cross_entropy_with_logits(x @ w, y)


def outer_optimizer(config: Config, params) -> torch.optim.Optimizer:
    if config.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.outer_lr)
    return torch.optim.Adam(params, lr=config.outer_lr)


@torch.no_grad()
def evaluate(config: Config, w) -> float:
    """Validation loss at weights `w`."""
    x, y = data(config)[1]
    return outer_cost(w.detach(), x, y).item()
