"""Weight-decay logistic regression in Betty 0.2.1: two `ImplicitProblem`s and an `Engine`.

Betty's `darts` scales by ξ = 1; the validation loss is multiplied by ξ = inner lr so the
hypergradient equals the DARTS-convention one of the other implementations (λ has no direct
gradient).
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

UNSUPPORTED = {"itd": "Betty's IterativeProblem (itd) does not run with torch 2.x",
               "aid_fd": "Betty's `darts` is a central finite difference (aid_fd_central); it has "
                         "no exact identity-Hessian product"}
TYPES = {"aid_fd_central": "darts", "aid_neumann": "neumann", "aid_cg": "cg"}


class Inner(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        w = self.module.w
        return (F.binary_cross_entropy_with_logits(self.module(x), y)
                + 0.5 * (torch.exp(self.outer()) * w * w).sum())


class Outer(ImplicitProblem):
    scale = 1.0

    def training_step(self, batch):
        x, y = batch
        return self.scale * F.binary_cross_entropy_with_logits(self.inner(x), y)


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        train, val = common.data(config)
        net, decay = common.model(config), common.LogDecay(common.initial_lam(config))
        inner_config = BettyConfig(type=TYPES[config.method], unroll_steps=config.unroll,
                                   darts_alpha=config.r, neumann_iterations=config.iters,
                                   neumann_alpha=config.inner_lr, cg_iterations=config.iters)
        self.inner = Inner(name="inner", module=net, config=inner_config,
                           optimizer=torch.optim.SGD(net.parameters(), lr=config.inner_lr),
                           train_data_loader=[train])
        self.outer = Outer(name="outer", module=decay, config=BettyConfig(),
                           optimizer=common.outer_optimizer(config, decay.parameters()),
                           train_data_loader=[val])
        if config.method == "aid_fd_central":
            self.outer.scale = config.inner_lr
        self.engine = Engine(config=EngineConfig(train_iters=10**9, logger_type="none",
                                                 strategy="cpu" if config.device == "cpu"
                                                 else "gpu"),
                             problems=[self.inner, self.outer],
                             dependencies={"u2l": {self.outer: [self.inner]},
                                           "l2u": {self.inner: [self.outer]}})

    def step(self):
        for _ in range(self.config.unroll):
            self.engine.train_step()

    def loss(self) -> float:
        return common.evaluate(self.config, self.inner.module.w)

    def outer_params(self):
        return [self.outer.module.lam]


def make(config: common.Config) -> Runner:
    return Runner(config)
