"""Weight-decay logistic regression in mlo: the inner level's module is the model, the outer
level's module is the bare hyperparameter vector λ (its handle returns it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mlo

from ..mlo_methods import describe, method
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        train, val = common.data(config)
        net = common.model(config)
        lam = nn.Parameter(common.initial_lam(config))
        self.net, self.lam = net, lam

        @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=config.inner_lr),
                   data=[train], unroll=config.unroll, name="wd_inner")
        def wd_inner(batch, module, wd_outer):
            x, y = batch
            w = module.params["w"]
            return (F.binary_cross_entropy_with_logits(module(x), y)
                    + 0.5 * (torch.exp(wd_outer()) * w * w).sum())

        @mlo.level(module=lam, optimizer=common.outer_optimizer(config, [lam]), data=[val],
                   name="wd_outer",
                   hypergrad=method(config.method, config.iters, config.r, config.inner_lr))
        def wd_outer(batch, wd_inner):
            x, y = batch
            return F.binary_cross_entropy_with_logits(wd_inner(x), y)

        levels = (wd_inner, wd_outer)
        self.note = describe(levels)
        self.program = mlo.Program(*levels)

    def step(self):
        for _ in range(self.config.unroll):
            self.program.step()

    def loss(self) -> float:
        return common.evaluate(self.config, self.net.w)

    def outer_params(self):
        return [self.lam]


def make(config: common.Config) -> Runner:
    return Runner(config)
