"""MAML in TorchOpt 0.7.3: `torchopt.MetaSGD` steps the network in place differentiably; per
task the state is extracted before the 5 steps and recovered after the query backward."""

from __future__ import annotations

import torch
import torchopt

from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner(common.Runner):
    def __init__(self, config: common.Config):
        super().__init__(config)
        self.inner_optimizer = torchopt.MetaSGD(self.net, lr=config.inner_lr)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.outer_lr)

    def step(self):
        config, net = self.config, self.net
        batch = self.next_meta_batch()
        self.optimizer.zero_grad()
        start = torchopt.extract_state_dict(net)
        for (xs, ys), (xq, yq) in batch:
            for _ in range(config.inner_steps):
                self.inner_optimizer.step(common.mse(net(xs), ys))
            (common.mse(net(xq), yq) / config.tasks).backward()
            torchopt.recover_state_dict(net, start)
        self.optimizer.step()


def make(config: common.Config) -> Runner:
    return Runner(config)
