"""Data reweighting (Meta-Weight-Net shape): the program every implementation computes.

Lower level (classifier θ, an MLP 784-h...-10) minimises, on a training batch with noisy labels,

    f(θ, φ) = mean_i  w_φ(ℓ_i) · ℓ_i,     ℓ_i = CE(net_θ(x_i), y_i),   w_φ = sigmoid(MLP 1-100-1)

where the weight net reads the per-sample loss as a constant (detached). Upper level (weight net φ)
minimises the clean meta loss  F(θ*(φ)) = CE(net_θ*(x_meta), y_meta). The classifier takes
`unroll` SGD steps (lr `inner_lr`) per outer step; the weight net then takes one step (Adam, lr
`outer_lr`) on the hypergradient of F. Batches are taken in a fixed order, the same for every
implementation: inner step k reads train batch k mod n, outer step t reads meta batch t mod m.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    method: str = "aid_fd"            # aid_fd | aid_fd_central | aid_cg | aid_neumann | itd
    unroll: int = 1                   # classifier steps per weight-net step
    hidden: tuple = (256,)            # classifier hidden widths
    batch: int = 128
    iters: int = 3                    # CG / Neumann iterations
    inner_lr: float = 0.1             # classifier SGD; also ξ of aid_fd and α of aid_neumann
    outer_lr: float = 1e-3            # weight-net Adam
    outer_optimizer: str = "adam"     # adam | sgd
    r: float = 0.01                   # aid_fd_central radius: ε = r / ‖v‖
    train_batches: int = 16
    meta_batches: int = 8
    noise: float = 0.4                # fraction of training labels replaced at random
    seed: int = 0
    device: str = "cpu"


CLASSES, FEATURES, WEIGHT_HIDDEN = 10, 784, 100


def classifier_module(config: Config) -> nn.Module:
    """The classifier as an nn.Module with the program's initial parameters."""
    widths = (FEATURES, *config.hidden, CLASSES)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    net.load_state_dict(_initial(config.seed, config.hidden)[0])
    return net.to(config.device)


def weight_module(config: Config) -> nn.Module:
    """The weight net 1-100-1 with a sigmoid output, with the program's initial parameters."""
    net = nn.Sequential(nn.Linear(1, WEIGHT_HIDDEN), nn.ReLU(), nn.Linear(WEIGHT_HIDDEN, 1),
                        nn.Sigmoid())
    net.load_state_dict(_initial(config.seed, config.hidden)[1])
    return net.to(config.device)


@lru_cache(maxsize=8)
def _initial(seed: int, hidden: tuple) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    widths = (FEATURES, *hidden, CLASSES)
    clf = {}
    index = 0
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layer = nn.Linear(a, b)
        clf[f"{index}.weight"], clf[f"{index}.bias"] = layer.weight.data, layer.bias.data
        index += 2
    w1, w2 = nn.Linear(1, WEIGHT_HIDDEN), nn.Linear(WEIGHT_HIDDEN, 1)
    wnet = {"0.weight": w1.weight.data, "0.bias": w1.bias.data,
            "2.weight": w2.weight.data, "2.bias": w2.bias.data}
    return clf, wnet


def labelled(g: torch.Generator, teacher: torch.Tensor, n: int, noise: float | None, device: str):
    """n inputs labelled by a linear teacher; with `noise`, that fraction gets a random label."""
    x = torch.randn(n, FEATURES, generator=g)
    y = (x @ teacher).argmax(1)
    if noise is not None:
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, torch.randint(0, CLASSES, (n,), generator=g), y)
    return x.to(device), y.to(device)


@lru_cache(maxsize=4)
def _data(seed: int, batch: int, train_batches: int, meta_batches: int, noise: float,
          device: str):
    g = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)

    def draw(n, noisy):
        return labelled(g, teacher, n, noise if noisy else None, device)

    train = [draw(batch, True) for _ in range(train_batches)]
    meta = [draw(batch, False) for _ in range(meta_batches)]
    evaluation = draw(1024, False)
    return train, meta, evaluation


def data(config: Config):
    """(train batches, meta batches, evaluation batch), identical for every implementation."""
    return _data(config.seed, config.batch, config.train_batches, config.meta_batches,
                 config.noise, config.device)


def outer_optimizer(config: Config, params) -> torch.optim.Optimizer:
    if config.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.outer_lr)
    return torch.optim.Adam(params, lr=config.outer_lr)


def mlp(params, x):
    """The classifier, functionally: params = [W1, b1, W2, b2, ...]."""
    for i in range(0, len(params) - 2, 2):
        x = F.relu(F.linear(x, params[i], params[i + 1]))
    return F.linear(x, params[-2], params[-1])


def weights(phi, losses):
    """The weight net, functionally, on per-sample losses of shape (n,)."""
    h = F.relu(F.linear(losses.unsqueeze(1), phi[0], phi[1]))
    return torch.sigmoid(F.linear(h, phi[2], phi[3])).squeeze(1)


@torch.no_grad()
def evaluate(config: Config, theta) -> float:
    """Clean cross-entropy of the classifier with parameters `theta` on a held-out batch."""
    x, y = data(config)[2]
    return F.cross_entropy(mlp([t.detach() for t in theta], x), y).item()
