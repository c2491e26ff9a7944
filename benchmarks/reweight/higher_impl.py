"""Reweighting in higher 0.2.1: itd through `higher.innerloop_ctx` with a differentiable SGD.

Each outer step opens an inner-loop context on the classifier (initial weights copied, so the
meta loss differentiates only into the weight net), takes `unroll` differentiable steps, takes the
weight-net step, and writes the final fast weights back into the classifier.
"""

from __future__ import annotations

import higher
import torch
import torch.nn.functional as F

from . import common

UNSUPPORTED = {m: "higher differentiates through unrolled optimizers only (no implicit "
                  "differentiation)" for m in ("aid_fd", "aid_fd_central", "aid_cg", "aid_neumann")}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        self.train, self.meta, _ = common.data(config)
        self.net = common.classifier_module(config)
        self.wnet = common.weight_module(config)
        self.inner_optimizer = torch.optim.SGD(self.net.parameters(), lr=config.inner_lr)
        self.optimizer = common.outer_optimizer(config, self.wnet.parameters())
        self.inner_steps = self.outer_steps = 0

    def step(self):
        config = self.config
        meta_x, meta_y = self.meta[self.outer_steps % len(self.meta)]
        self.outer_steps += 1
        with higher.innerloop_ctx(self.net, self.inner_optimizer,
                                  copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(config.unroll):
                x, y = self.train[self.inner_steps % len(self.train)]
                self.inner_steps += 1
                losses = F.cross_entropy(fnet(x), y, reduction="none")
                w = self.wnet(losses.detach().unsqueeze(1)).squeeze(1)
                diffopt.step((w * losses).mean())
            outer = F.cross_entropy(fnet(meta_x), meta_y)
            self.optimizer.zero_grad()
            outer.backward(inputs=list(self.wnet.parameters()))
            self.optimizer.step()
            with torch.no_grad():
                for p, q in zip(self.net.parameters(), fnet.parameters()):
                    p.copy_(q)

    def loss(self) -> float:
        return common.evaluate(self.config, list(self.net.parameters()))

    def outer_params(self):
        return list(self.wnet.parameters())


def make(config: common.Config) -> Runner:
    return Runner(config)
