"""Reweighting in Betty 0.2.1: two `ImplicitProblem`s and an `Engine`, as Betty's examples write it.

Betty's `darts` hypergradient uses ξ = 1; the meta loss is multiplied by ξ = classifier lr so the
hypergradient equals DARTS' (and the other implementations') ξ-scaled one. Betty's implicit types
map to the methods: darts = aid_fd_central, neumann = aid_neumann, cg = aid_cg.
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


class Classifier(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        w = self.weighting(losses.detach().unsqueeze(1)).squeeze(1)
        return (w * losses).mean()


class Weighting(ImplicitProblem):
    scale = 1.0

    def training_step(self, batch):
        x, y = batch
        return self.scale * F.cross_entropy(self.classifier(x), y)


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        train, meta, _ = common.data(config)
        net, wnet = common.classifier_module(config), common.weight_module(config)
        inner_config = BettyConfig(type=TYPES[config.method], unroll_steps=config.unroll,
                                   darts_alpha=config.r, neumann_iterations=config.iters,
                                   neumann_alpha=config.inner_lr, cg_iterations=config.iters,
                                   log_step=-1)
        self.classifier = Classifier(name="classifier", module=net, config=inner_config,
                                     optimizer=torch.optim.SGD(net.parameters(),
                                                               lr=config.inner_lr),
                                     train_data_loader=train)
        self.weighting = Weighting(name="weighting", module=wnet, config=BettyConfig(),
                                   optimizer=common.outer_optimizer(config, wnet.parameters()),
                                   train_data_loader=meta)
        if config.method == "aid_fd_central":
            self.weighting.scale = config.inner_lr
        problems = [self.classifier, self.weighting]
        dependencies = {"u2l": {self.weighting: [self.classifier]},
                        "l2u": {self.classifier: [self.weighting]}}
        self.engine = Engine(config=EngineConfig(train_iters=10**9, logger_type="none",
                                                 strategy="cpu" if config.device == "cpu"
                                                 else "gpu"),
                             problems=problems, dependencies=dependencies)

    def step(self):
        for _ in range(self.config.unroll):
            self.engine.train_step()

    def loss(self) -> float:
        return common.evaluate(self.config, list(self.classifier.module.parameters()))

    def outer_params(self):
        return list(self.weighting.module.parameters())


def make(config: common.Config) -> Runner:
    return Runner(config)
