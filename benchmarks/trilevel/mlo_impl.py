"""The three-level program in mlo: three decorated cost functions; the graph comes from the
signatures (reweight declares the hypergradient, so it is above pretrain; finetune and reweight
read pretrain's solution, reweight reads finetune's)."""

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
        source, target, val, _ = common.data(config)
        pre, fine, wnet = common.modules(config)
        self.fine, self.wnet = fine, wnet
        mu = config.proximal

        @mlo.level(module=pre, optimizer=torch.optim.SGD(pre.parameters(), lr=config.pretrain_lr),
                   data=source, name="da_pretrain")
        def da_pretrain(batch, module, da_reweight):
            x, y = batch
            losses = F.cross_entropy(module(x), y, reduction="none")
            return (da_reweight(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

        @mlo.level(module=fine, optimizer=torch.optim.SGD(fine.parameters(),
                                                          lr=config.finetune_lr),
                   data=target, name="da_finetune")
        def da_finetune(batch, module, da_pretrain):
            x, y = batch
            own, other = module.params, da_pretrain.params
            distance = sum(((own[k] - other[k]) ** 2).sum() for k in own)
            return F.cross_entropy(module(x), y) + 0.5 * mu * distance

        @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=config.outer_lr),
                   data=val, name="da_reweight",
                   hypergrad=method(config.method, config.iters, config.r))
        def da_reweight(batch, da_finetune, da_pretrain):
            x, y = batch
            return F.cross_entropy(da_finetune(x), y) + F.cross_entropy(da_pretrain(x), y)

        levels = (da_pretrain, da_finetune, da_reweight)
        self.note = describe(levels)
        self.program = mlo.Program(*levels)

    def step(self):
        self.program.step()

    def loss(self) -> float:
        return common.evaluate(self.config, list(self.fine.parameters()))

    def outer_params(self):
        return list(self.wnet.parameters())


def make(config: common.Config) -> Runner:
    return Runner(config)
