"""MAML in higher 0.2.1: per task, `higher.innerloop_ctx` with copy_initial_weights=False (the
unroll starts from φ itself), 5 `diffopt.step`s, the query loss / T backpropagated to φ."""

from __future__ import annotations

import higher
import torch

from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner(common.Runner):
    def __init__(self, config: common.Config):
        super().__init__(config)
        self.inner_optimizer = torch.optim.SGD(self.net.parameters(), lr=config.inner_lr)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.outer_lr)

    def step(self):
        config = self.config
        batch = self.next_meta_batch()
        self.optimizer.zero_grad()
        for (xs, ys), (xq, yq) in batch:
            with higher.innerloop_ctx(self.net, self.inner_optimizer,
                                      copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(config.inner_steps):
                    diffopt.step(common.mse(fnet(xs), ys))
                (common.mse(fnet(xq), yq) / config.tasks).backward()
        self.optimizer.step()


def make(config: common.Config) -> Runner:
    return Runner(config)
