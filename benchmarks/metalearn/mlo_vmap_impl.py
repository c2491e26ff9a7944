"""MAML in mlo with the tasks side by side: as mlo_impl, with `tasks=T, vmap=True` on the meta
level (mlo/task_axis.py): every batch stacks the T tasks along a leading axis, one meta step
takes 5 global steps."""

from __future__ import annotations

import copy

import torch

import mlo

from ..mlo_methods import describe
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner(common.Runner):
    def __init__(self, config: common.Config):
        super().__init__(config)
        tasks, t = common.tasks(config), config.tasks
        batches = [common.stacked(tasks[j * t:(j + 1) * t]) for j in range(config.batches)]
        learner = copy.deepcopy(self.net)
        steps = config.inner_steps

        @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(),
                                                             lr=config.inner_lr),
                   data=[s for s, _ in batches for _ in range(steps)], unroll=steps,
                   name="maml_adapt")
        def maml_adapt(batch, module, maml_meta: mlo.Init):
            x, y = batch
            return common.mse(module(x), y)

        @mlo.level(module=self.net, optimizer=torch.optim.Adam(self.net.parameters(),
                                                               lr=config.outer_lr),
                   data=[q for _, q in batches], hypergrad=config.method, tasks=t, vmap=True,
                   name="maml_meta")
        def maml_meta(batch, maml_adapt):
            x, y = batch
            return common.mse(maml_adapt(x), y)

        levels = (maml_adapt, maml_meta)
        self.note = describe(levels) + ", vmap=True"
        self.program = mlo.Program(*levels)
        self.global_steps = steps

    def step(self):
        for _ in range(self.global_steps):
            self.program.step()


def make(config: common.Config) -> Runner:
    return Runner(config)
