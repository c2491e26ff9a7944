"""Hand-written MAML with the tasks side by side: θ₀ = φ broadcast over a leading task axis, the
T tasks' losses evaluated with torch.func.vmap over functional_call, 5 differentiable SGD steps
on the sum of the losses (each task's parameters get their own gradient), then the mean query
loss backpropagated to φ; one Adam step per meta-batch."""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner(common.Runner):
    def __init__(self, config: common.Config):
        super().__init__(config)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.outer_lr)
        net = self.net
        self.losses = vmap(lambda theta, x, y: common.mse(functional_call(net, theta, (x,)), y))

    def step(self):
        config, net = self.config, self.net
        (xs, ys), (xq, yq) = common.stacked(self.next_meta_batch())
        self.optimizer.zero_grad()
        theta = {k: p.expand(config.tasks, *p.shape) for k, p in net.named_parameters()}
        for _ in range(config.inner_steps):
            grads = torch.autograd.grad(self.losses(theta, xs, ys).sum(), list(theta.values()),
                                        create_graph=True)
            theta = {k: t - config.inner_lr * g for (k, t), g in zip(theta.items(), grads)}
        self.losses(theta, xq, yq).mean().backward()
        self.optimizer.step()


def make(config: common.Config) -> Runner:
    return Runner(config)
