"""MAML in mlo: the learner starts each window from the meta level (`mlo.Init`), takes
`unroll=5` SGD steps on its support batches, and the meta level (hypergrad="itd", tasks=T)
averages T tasks per Adam step."""

from __future__ import annotations

import copy

import torch

import mlo

from ..mlo_methods import describe
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner(common.Runner):
    VMAP = False  # tasks one after another; mlo_vmap_impl sets it: side by side

    def __init__(self, config: common.Config):
        super().__init__(config)
        tasks, steps = common.tasks(config), config.inner_steps
        if self.VMAP:  # one batch per meta-batch, the T tasks stacked along a leading axis
            t = config.tasks
            tasks = [common.stacked(tasks[j * t:(j + 1) * t]) for j in range(config.batches)]
        learner = copy.deepcopy(self.net)

        @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(),
                                                             lr=config.inner_lr),
                   data=[s for s, _ in tasks for _ in range(steps)], unroll=steps,
                   name="maml_adapt")
        def maml_adapt(batch, module, maml_meta: mlo.Init):
            x, y = batch
            return common.mse(module(x), y)

        @mlo.level(module=self.net, optimizer=torch.optim.Adam(self.net.parameters(),
                                                               lr=config.outer_lr),
                   data=[q for _, q in tasks], hypergrad=config.method, tasks=config.tasks,
                   vmap=self.VMAP, name="maml_meta")
        def maml_meta(batch, maml_adapt):
            x, y = batch
            return common.mse(maml_adapt(x), y)

        levels = (maml_adapt, maml_meta)
        self.note = describe(levels) + (", vmap=True" if self.VMAP else "")
        self.program = mlo.Program(*levels)
        self.global_steps = steps if self.VMAP else steps * config.tasks

    def step(self):
        for _ in range(self.global_steps):
            self.program.step()


def make(config: common.Config) -> Runner:
    return Runner(config)
