"""Hand-written weight-decay logistic regression with torch.autograd, no library.

Inner steps differentiate w only (λ enters as a constant); aid_fd is the exact
−ξ ∂²f/∂λ∂w · v = −ξ exp(λ) ⊙ w ⊙ v, written out because λ enters f only through the penalty
½ Σ exp(λ_j) w_j² (no pass over the data at all); aid_fd_central evaluates ∇_λ f at the two
perturbed points, where w ± εv are constants so autograd records only the λ-dependent penalty;
aid_cg / aid_neumann build ∇_w f once with create_graph and reuse it for every Hessian-vector
product and the mixed product; itd records exactly the unrolled steps.
"""

from __future__ import annotations

import torch

from .. import linalg
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        (self.x, self.y), (self.xv, self.yv) = common.data(config)
        self.w = common.model(config).w.detach().clone().requires_grad_()
        self.lam = common.initial_lam(config).requires_grad_()
        self.optimizer = common.outer_optimizer(config, [self.lam])

    def step(self):
        config = self.config
        if config.method == "itd":
            hypergrad = self.itd()
        else:
            lam = self.lam.detach()
            for _ in range(config.unroll):
                (g,) = torch.autograd.grad(common.inner_cost(self.w, lam, self.x, self.y), self.w)
                with torch.no_grad():
                    self.w.sub_(config.inner_lr * g)
            (v,) = torch.autograd.grad(common.outer_cost(self.w, self.xv, self.yv), self.w)
            if config.method == "aid_fd":
                hypergrad = -config.inner_lr * torch.exp(self.lam.detach()) * self.w.detach() * v
            elif config.method == "aid_fd_central":
                hypergrad = self.finite_difference(v)
            else:
                hypergrad = self.implicit(v)
        self.lam.grad = hypergrad
        self.optimizer.step()

    def finite_difference(self, v):
        config = self.config
        epsilon = config.r / v.norm()
        with torch.no_grad():
            plus, minus = self.w + epsilon * v, self.w - epsilon * v
        difference = (common.inner_cost(plus, self.lam, self.x, self.y)
                      - common.inner_cost(minus, self.lam, self.x, self.y))
        (g,) = torch.autograd.grad(difference, self.lam)
        return -config.inner_lr / (2 * epsilon) * g

    def implicit(self, v):
        config = self.config
        (gradient,) = torch.autograd.grad(common.inner_cost(self.w, self.lam, self.x, self.y),
                                          self.w, create_graph=True)

        def hvp(u):
            return torch.autograd.grad(gradient, self.w, u[0], retain_graph=True)

        if config.method == "aid_cg":
            (u,) = linalg.cg(hvp, [v], config.iters)
        else:
            (u,) = linalg.neumann(hvp, [v], config.iters, config.inner_lr)
        (mixed,) = torch.autograd.grad(gradient, self.lam, u)
        return -mixed

    def itd(self):
        config = self.config
        w = self.w
        for _ in range(config.unroll):
            (g,) = torch.autograd.grad(common.inner_cost(w, self.lam, self.x, self.y), w,
                                       create_graph=True)
            w = w - config.inner_lr * g
        (hypergrad,) = torch.autograd.grad(common.outer_cost(w, self.xv, self.yv), self.lam)
        self.w = w.detach().requires_grad_()
        return hypergrad

    def loss(self) -> float:
        return common.evaluate(self.config, self.w)

    def outer_params(self):
        return [self.lam]


def make(config: common.Config) -> Runner:
    return Runner(config)
