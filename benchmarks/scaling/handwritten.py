"""Hand-written single hypergradients with torch.autograd (the same kernels as logreg)."""

from __future__ import annotations

import torch

from .. import linalg
from .common import Problem, inner_cost

UNSUPPORTED = {"explicit": "only the explicit implementation builds matrices"}


def hypergradient(method: str, p: Problem):
    """Return a closure computing (dw*/dλ)ᵀ v once with `method`."""
    def implicit():
        w, lam = p.w.detach().requires_grad_(), p.lam.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(inner_cost(w, lam, p.x, p.y), w, create_graph=True)
        hvp = lambda u: torch.autograd.grad(gradient, w, u[0], retain_graph=True)
        if method == "aid_cg":
            (u,) = linalg.cg(hvp, [p.v], p.iters)
        else:
            (u,) = linalg.neumann(hvp, [p.v], p.iters, p.lr)
        return -torch.autograd.grad(gradient, lam, u)[0]

    def finite_difference():
        lam = p.lam.detach().requires_grad_()
        epsilon = p.r / p.v.norm()
        difference = (inner_cost(p.w + epsilon * p.v, lam, p.x, p.y)
                      - inner_cost(p.w - epsilon * p.v, lam, p.x, p.y))
        return -p.lr / (2 * epsilon) * torch.autograd.grad(difference, lam)[0]

    def itd():
        w0, lam = p.w.detach().requires_grad_(), p.lam.detach().requires_grad_()
        w = w0
        for _ in range(p.steps):
            (g,) = torch.autograd.grad(inner_cost(w, lam, p.x, p.y), w, create_graph=True)
            w = w - p.lr * g
        return torch.autograd.grad(w, lam, p.v)[0]

    def mixed_product():
        # λ enters f only through ½ Σ exp(λ_j) w_j²: ∂²f/∂λ∂w · v = exp(λ) ⊙ w ⊙ v
        return -p.lr * torch.exp(p.lam) * p.w * p.v

    return {"aid_cg": implicit, "aid_neumann": implicit, "aid_fd": mixed_product,
            "aid_fd_central": finite_difference, "itd": itd}[method]
