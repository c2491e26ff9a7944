"""The three-level program in Betty 0.2.1: three `ImplicitProblem`s; Betty finds both paths.

Betty's `darts` (the central difference, aid_fd_central) uses ξ = 1 on every best-response VJP.
To compute the same hypergradient as the other implementations (ξ = that level's learning rate),
reweight's cost multiplies the term that reaches ψ through finetune and pretrain by ξ_f ξ_p,
and the term through pretrain alone by ξ_p (ψ has no direct gradient, and each VJP is linear in
its vector up to the finite-difference error). Betty evaluates the pretrain VJP once per path
instead of once on their sum.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from betty.configs import Config as BettyConfig
from betty.configs import EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem

from . import common

get_logger().setLevel(logging.WARNING)

UNSUPPORTED = {"aid_fd": "Betty's `darts` is a central finite difference (aid_fd_central); it has "
                         "no exact identity-Hessian product"}
TYPES = {"aid_fd_central": "darts", "aid_cg": "cg"}


class Pretrain(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (self.reweight(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()


class Finetune(ImplicitProblem):
    proximal = 0.1

    def training_step(self, batch):
        x, y = batch
        distance = sum(((a - b) ** 2).sum() for a, b in zip(self.module.parameters(),
                                                            self.pretrain.module.parameters()))
        return F.cross_entropy(self.module(x), y) + 0.5 * self.proximal * distance


class Reweight(ImplicitProblem):
    scales = (1.0, 1.0)

    def training_step(self, batch):
        x, y = batch
        return (self.scales[0] * F.cross_entropy(self.finetune(x), y)
                + self.scales[1] * F.cross_entropy(self.pretrain(x), y))


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        source, target, val, _ = common.data(config)
        pre, fine, wnet = common.modules(config)

        def lower(lr):
            return BettyConfig(type=TYPES[config.method], darts_alpha=config.r,
                               cg_iterations=config.iters)

        self.pretrain = Pretrain(name="pretrain", module=pre, config=lower(config.pretrain_lr),
                                 optimizer=torch.optim.SGD(pre.parameters(),
                                                           lr=config.pretrain_lr),
                                 train_data_loader=source)
        self.finetune = Finetune(name="finetune", module=fine,
                                 config=lower(config.finetune_lr),
                                 optimizer=torch.optim.SGD(fine.parameters(),
                                                           lr=config.finetune_lr),
                                 train_data_loader=target)
        self.finetune.proximal = config.proximal
        self.reweight = Reweight(name="reweight", module=wnet, config=BettyConfig(),
                                 optimizer=torch.optim.Adam(wnet.parameters(),
                                                            lr=config.outer_lr),
                                 train_data_loader=val)
        if config.method == "aid_fd_central":
            self.reweight.scales = (config.pretrain_lr * config.finetune_lr, config.pretrain_lr)
        problems = [self.pretrain, self.finetune, self.reweight]
        dependencies = {"u2l": {self.reweight: [self.pretrain]},
                        "l2u": {self.pretrain: [self.finetune, self.reweight],
                                self.finetune: [self.reweight]}}
        self.engine = Engine(config=EngineConfig(train_iters=10**9, logger_type="none",
                                                 strategy="cpu" if config.device == "cpu"
                                                 else "gpu"),
                             problems=problems, dependencies=dependencies)

    def step(self):
        self.engine.train_step()

    def loss(self) -> float:
        return common.evaluate(self.config, list(self.finetune.module.parameters()))

    def outer_params(self):
        return list(self.reweight.module.parameters())


def make(config: common.Config) -> Runner:
    return Runner(config)
