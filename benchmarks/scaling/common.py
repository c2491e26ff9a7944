"""One hypergradient of per-feature weight-decay logistic regression at growing dimension d.

f(w, λ) = mean BCE(Xw, y) + ½ Σ exp(λ_j) w_j² with X of shape (n, d), n = 64; v = ∇_w of the
validation loss. Every method computes (dw*/dλ)ᵀ v at the same (w, λ, v), with no inner training
in the timing except itd's `steps` unrolled SGD steps, which are what it differentiates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    lam: torch.Tensor
    v: torch.Tensor
    lr: float = 0.1
    iters: int = 10      # CG / Neumann iterations
    steps: int = 10      # itd unrolled steps
    r: float = 0.01


def problem(d: int, n: int = 64, seed: int = 0, device: str = "cpu") -> Problem:
    g = torch.Generator().manual_seed(seed)
    truth = 3 * torch.randn(d, generator=g) / math.sqrt(d)
    x = torch.randn(n, d, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ truth), generator=g)
    xv = torch.randn(n, d, generator=g)
    yv = torch.bernoulli(torch.sigmoid(xv @ truth), generator=g)
    w = 0.1 * torch.randn(d, generator=g) / math.sqrt(d) * math.sqrt(n)
    lam = torch.full((d,), math.log(1e-2))
    wv = w.clone().requires_grad_()
    (v,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(xv @ wv, yv), wv)
    to = lambda t: t.to(device)
    return Problem(to(x), to(y), to(w), to(lam), to(v))


def inner_cost(w, lam, x, y):
    return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (torch.exp(lam) * w * w).sum()
