"""Reweighting in mlo: two decorated cost functions and a `Program`, as DESIGN.md §2 writes it.

One outer step is `unroll` calls of `program.step()`: the classifier steps every call, the weight
net once the classifier has taken `unroll` steps since its last step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlo

from ..mlo_methods import describe, method
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        train, meta, _ = common.data(config)
        net, wnet = common.classifier_module(config), common.weight_module(config)
        self.net, self.wnet = net, wnet

        @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=config.inner_lr),
                   data=train, unroll=config.unroll, name="rw_classifier")
        def rw_classifier(batch, module, rw_weighting):
            x, y = batch
            losses = F.cross_entropy(module(x), y, reduction="none")
            return (rw_weighting(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

        @mlo.level(module=wnet, optimizer=common.outer_optimizer(config, wnet.parameters()),
                   data=meta, name="rw_weighting",
                   hypergrad=method(config.method, config.iters, config.r, config.inner_lr))
        def rw_weighting(batch, rw_classifier):
            x, y = batch
            return F.cross_entropy(rw_classifier(x), y)

        levels = (rw_classifier, rw_weighting)
        self.note = describe(levels)
        self.program = mlo.Program(*levels)

    def step(self):
        for _ in range(self.config.unroll):
            self.program.step()

    def loss(self) -> float:
        return common.evaluate(self.config, list(self.net.parameters()))

    def outer_params(self):
        return list(self.wnet.parameters())


def make(config: common.Config) -> Runner:
    return Runner(config)
