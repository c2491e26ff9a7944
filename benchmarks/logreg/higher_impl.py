"""Weight-decay logistic regression in higher 0.2.1: itd through `higher.innerloop_ctx`."""

from __future__ import annotations

import higher
import torch

from . import common

UNSUPPORTED = {m: "higher differentiates through unrolled optimizers only (no implicit "
                  "differentiation)" for m in ("aid_fd", "aid_fd_central", "aid_cg", "aid_neumann")}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        (self.x, self.y), (self.xv, self.yv) = common.data(config)
        self.net = common.model(config)
        self.lam = common.initial_lam(config).requires_grad_()
        self.inner_optimizer = torch.optim.SGD(self.net.parameters(), lr=config.inner_lr)
        self.optimizer = common.outer_optimizer(config, [self.lam])

    def step(self):
        with higher.innerloop_ctx(self.net, self.inner_optimizer,
                                  copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(self.config.unroll):
                diffopt.step(common.inner_cost(fnet.w, self.lam, self.x, self.y))
            outer = common.outer_cost(fnet.w, self.xv, self.yv)
            self.optimizer.zero_grad()
            outer.backward(inputs=[self.lam])
            self.optimizer.step()
            with torch.no_grad():
                self.net.w.copy_(fnet.w)

    def loss(self) -> float:
        return common.evaluate(self.config, self.net.w)

    def outer_params(self):
        return [self.lam]


def make(config: common.Config) -> Runner:
    return Runner(config)
