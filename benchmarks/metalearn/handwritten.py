"""Hand-written MAML with torch.autograd: per task, 5 differentiable SGD steps from φ
(create_graph), then the query loss / T backpropagated to φ; one Adam step per meta-batch."""

from __future__ import annotations

import torch
from torch.func import functional_call

from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner(common.Runner):
    def __init__(self, config: common.Config):
        super().__init__(config)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.outer_lr)

    def step(self):
        config, net = self.config, self.net
        batch = self.next_meta_batch()
        self.optimizer.zero_grad()
        phi = dict(net.named_parameters())
        for (xs, ys), (xq, yq) in batch:
            theta = phi
            for _ in range(config.inner_steps):
                loss = common.mse(functional_call(net, theta, (xs,)), ys)
                grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
                theta = {k: t - config.inner_lr * g for (k, t), g in zip(theta.items(), grads)}
            (common.mse(functional_call(net, theta, (xq,)), yq) / config.tasks).backward()
        self.optimizer.step()


def make(config: common.Config) -> Runner:
    return Runner(config)
