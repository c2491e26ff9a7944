"""Three-level program in the shape of pretraining/finetuning domain adaptation.

    pretrain (θ_p):  f_p(θ_p, ψ) = mean_i w_ψ(ℓ_i) ℓ_i,  ℓ_i = CE(net_θp(x_i), y_i) on noisy
                     source data, the weight net reading the per-sample loss as a constant;
    finetune (θ_f):  f_f(θ_f, θ_p) = CE(net_θf(x), y) on target data + (μ/2) ‖θ_f − θ_p‖²;
    reweight (ψ):    C_r(θ_f, θ_p) = CE(net_θf(x_val), y_val) + CE(net_θp(x_val), y_val).

Reweight's parameters enter pretrain's cost (upper to lower); pretrain's solution enters
finetune's and reweight's costs, finetune's solution enters reweight's (lower to upper). Its
hypergradient sums two paths, ψ → θ_p → C_r and ψ → θ_p → θ_f → C_r:

    g_ψ = (dθ_p*/dψ)ᵀ [∂C_r/∂θ_p + (dθ_f*/dθ_p)ᵀ ∂C_r/∂θ_f].

Each global step: pretrain one SGD step, finetune one SGD step, reweight one Adam step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..reweight.common import labelled


@dataclass(frozen=True)
class Config:
    method: str = "aid_fd"            # aid_fd | aid_fd_central | aid_cg
    hidden: int = 256
    batch: int = 128
    iters: int = 3                    # CG iterations
    pretrain_lr: float = 0.1          # SGD; ξ of the pretrain best response in aid_fd
    finetune_lr: float = 0.1          # SGD; ξ of the finetune best response in aid_fd
    outer_lr: float = 1e-3            # reweight Adam
    proximal: float = 0.1             # μ
    r: float = 0.01
    batches: int = 8
    noise: float = 0.4
    seed: int = 0
    device: str = "cpu"


CLASSES, FEATURES, WEIGHT_HIDDEN = 10, 784, 100


def _net(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


@lru_cache(maxsize=4)
def _initial(seed: int, hidden: int):
    torch.manual_seed(seed)
    pre = _net(hidden).state_dict()
    fine = _net(hidden).state_dict()
    wnet = nn.Sequential(nn.Linear(1, WEIGHT_HIDDEN), nn.ReLU(), nn.Linear(WEIGHT_HIDDEN, 1),
                         nn.Sigmoid()).state_dict()
    return pre, fine, wnet


def modules(config: Config):
    """(pretrain net, finetune net, weight net) with the program's initial parameters."""
    pre, fine, wnet = _initial(config.seed, config.hidden)
    nets = [_net(config.hidden), _net(config.hidden),
            nn.Sequential(nn.Linear(1, WEIGHT_HIDDEN), nn.ReLU(), nn.Linear(WEIGHT_HIDDEN, 1),
                          nn.Sigmoid())]
    for net, state in zip(nets, (pre, fine, wnet)):
        net.load_state_dict(state)
    return tuple(net.to(config.device) for net in nets)


@lru_cache(maxsize=4)
def _data(seed: int, batch: int, batches: int, noise: float, device: str):
    g = torch.Generator().manual_seed(seed + 1)
    source_teacher = torch.randn(FEATURES, CLASSES, generator=g)
    target_teacher = source_teacher + 0.5 * torch.randn(FEATURES, CLASSES, generator=g)

    def draw(teacher, n, noisy):
        return labelled(g, teacher, n, noise if noisy else None, device)

    source = [draw(source_teacher, batch, True) for _ in range(batches)]
    target = [draw(target_teacher, batch, False) for _ in range(batches)]
    val = [draw(target_teacher, batch, False) for _ in range(batches)]
    evaluation = draw(target_teacher, 1024, False)
    return source, target, val, evaluation


def data(config: Config):
    """(source batches, target batches, target validation batches, evaluation batch)."""
    return _data(config.seed, config.batch, config.batches, config.noise, config.device)


def mlp(params, x):
    return F.linear(F.relu(F.linear(x, params[0], params[1])), params[2], params[3])


def weights(psi, losses):
    h = F.relu(F.linear(losses.unsqueeze(1), psi[0], psi[1]))
    return torch.sigmoid(F.linear(h, psi[2], psi[3])).squeeze(1)


def proximal(config: Config, theta_f, theta_p):
    return 0.5 * config.proximal * sum(((a - b) ** 2).sum() for a, b in zip(theta_f, theta_p))


@torch.no_grad()
def evaluate(config: Config, theta_f) -> float:
    """Target cross-entropy of the finetuned net on a held-out batch."""
    x, y = data(config)[3]
    return F.cross_entropy(mlp([t.detach() for t in theta_f], x), y).item()
