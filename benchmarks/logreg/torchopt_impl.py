"""Weight-decay logistic regression in TorchOpt 0.7.3.

aid_cg / aid_neumann: the `unroll` SGD steps are the solver of a
`torchopt.diff.implicit.custom_root` whose optimality condition is ∇_w f; itd: `torchopt.MetaSGD`
on the model, detached with `torchopt.stop_gradient` after each outer step.
"""

from __future__ import annotations

import torch
import torchopt
from torch.func import grad

from ..torchopt_common import implicit
from . import common

UNSUPPORTED = {m: "TorchOpt has no identity-Hessian (DARTS) hypergradient, exact or by finite "
                  "differences" for m in ("aid_fd", "aid_fd_central")}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        (self.x, self.y), (self.xv, self.yv) = common.data(config)
        self.net = common.model(config)
        self.lam = common.initial_lam(config).requires_grad_()
        self.optimizer = common.outer_optimizer(config, [self.lam])
        if config.method == "itd":
            self.inner_optimizer = torchopt.MetaSGD(self.net, lr=config.inner_lr)
        else:
            self.solver = implicit(config, self.optimality, self.solve)

    def optimality(self, w, lam, x, y):
        return grad(common.inner_cost, argnums=0)(w, lam, x, y)

    def solve(self, w, lam, x, y):
        w = w.detach().requires_grad_()
        lam = lam.detach()
        with torch.enable_grad():
            for _ in range(self.config.unroll):
                (g,) = torch.autograd.grad(common.inner_cost(w, lam, x, y), w)
                with torch.no_grad():
                    w.sub_(self.config.inner_lr * g)
        return w.detach()

    def step(self):
        config = self.config
        if config.method == "itd":
            for _ in range(config.unroll):
                w = self.net.w
                self.inner_optimizer.step(common.inner_cost(w, self.lam, self.x, self.y))
            outer = common.outer_cost(self.net.w, self.xv, self.yv)
        else:
            w = self.solver(self.net.w.detach(), self.lam, self.x, self.y)
            with torch.no_grad():
                self.net.w.copy_(w)
            outer = common.outer_cost(w, self.xv, self.yv)
        self.optimizer.zero_grad()
        outer.backward(inputs=[self.lam])
        self.optimizer.step()
        if config.method == "itd":
            torchopt.stop_gradient(self.net)
            torchopt.stop_gradient(self.inner_optimizer)

    def loss(self) -> float:
        return common.evaluate(self.config, self.net.w)

    def outer_params(self):
        return [self.lam]


def make(config: common.Config) -> Runner:
    return Runner(config)
