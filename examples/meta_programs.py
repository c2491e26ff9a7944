"""Build the meta-learning programs the examples compare: MAML, FOMAML, Meta-SGD, iMAML, Reptile.

Shared by `maml_sinusoid.py` (regression) and `few_shot.py` (classification); they differ only in
the network and the loss `loss(output, target)`. A task is ((x_support, y_support), (x_query,
y_query)). The learner takes `steps` SGD steps (lr `inner_lr`) per task from θ₀ = φ (`mlo.Init`);
the meta level steps once per meta-batch of `settings.tasks` tasks (`tasks=T`) with Adam
(`settings.outer_lr`); Reptile uses plain SGD with lr 0.1 on the pull towards θ_T. iMAML adds
λ/2‖θ − φ‖² (λ = `settings.imaml_lambda`) to the inner cost and uses `aid_cg(iters=5)`.
With `settings.vmap`, MAML and FOMAML run each meta-batch's tasks side by side (`tasks=T,
vmap=True`, FOMAML as `itd(first_order=True)`); the others run them one after another.
"""

import copy
import time

import torch
from torch import nn
from torch.func import functional_call

import mlo

HYPERGRADS = {"MAML": "itd", "Meta-SGD": "itd", "FOMAML": "first_order", "Reptile": None}


class TaskParts:
    """Re-iterate part `part` (0: support, 1: query) of each task, `repeat` times in a row.

    `tasks` is any sequence of tasks; one that builds each task on indexing keeps only one task's
    images in memory at a time.
    """

    def __init__(self, tasks, part, repeat=1):
        self.tasks, self.part, self.repeat = tasks, part, repeat

    def __len__(self):
        return len(self.tasks) * self.repeat

    def __iter__(self):
        for task in self.tasks:
            for _ in range(self.repeat):
                yield task[self.part]


class StackedParts(TaskParts):
    """Part `part` of each meta-batch of `size` tasks, stacked along a leading task axis (for
    `vmap=True`): one batch per meta-batch, `repeat` times in a row."""

    def __init__(self, tasks, part, size, repeat=1):
        super().__init__(tasks, part, repeat)
        self.size = size

    def __len__(self):
        return len(self.tasks) // self.size * self.repeat

    def __iter__(self):
        for start in range(0, len(self.tasks) - self.size + 1, self.size):
            parts = [self.tasks[i][self.part] for i in range(start, start + self.size)]
            batch = tuple(torch.stack(tensors) for tensors in zip(*parts))
            for _ in range(self.repeat):
                yield batch


def adapt_level(method, learner, optimizer, support, loss, steps, prox):
    """The learner: `steps` SGD steps per task from θ₀ = φ (`mlo.Init`)."""
    if method == "Meta-SGD":
        def adapt(batch, module, meta: mlo.Init, rates):  # its optimizer's lrs are `rates`
            return loss(module(batch[0]), batch[1])
    else:
        def adapt(batch, module, meta: mlo.Init):
            cost = loss(module(batch[0]), batch[1])
            if prox:  # iMAML: stay near the start; its implicit gradient is the meta-gradient
                cost = cost + 0.5 * prox * sum(((p - q) ** 2).sum() for p, q in
                                               zip(module.params.values(), meta.params.values()))
            return cost
    return mlo.level(module=learner, optimizer=optimizer, data=support, unroll=steps)(adapt)


def meta_level(method, meta_net, queries, loss, settings):
    """The meta-parameters φ: one step per meta-batch of `settings.tasks` tasks."""
    if method == "Reptile":
        def meta(module, adapt):  # gradient φ − θ_T: SGD moves φ towards θ_T
            return sum(0.5 * ((p - q.detach()) ** 2).sum()
                       for p, q in zip(module.params.values(), adapt.params.values()))
        outer = torch.optim.SGD(meta_net.parameters(), lr=0.1)
    else:
        def meta(batch, adapt):
            return loss(adapt(batch[0]), batch[1])
        outer = torch.optim.Adam(meta_net.parameters(), lr=settings.outer_lr)
    hypergrad = mlo.hypergrad.aid_cg(iters=5) if method == "iMAML" else HYPERGRADS[method]
    vmap = side_by_side(method, settings)
    if vmap and method == "FOMAML":  # recorded live, as MAML, with each step's gradient constant
        hypergrad = mlo.hypergrad.itd(first_order=True)
    return mlo.level(module=meta_net, optimizer=outer, data=queries, hypergrad=hypergrad,
                     tasks=settings.tasks, vmap=vmap)(meta)


def side_by_side(method, settings) -> bool:
    """Whether `method` runs its meta-batch's tasks side by side (`--vmap`: MAML and FOMAML)."""
    return getattr(settings, "vmap", False) and method in ("MAML", "FOMAML")


def meta_train(method, meta_net, tasks, loss, settings, inner_lr, steps):
    """Train φ = `meta_net` by `method` on `tasks`; return the learned rates or None, s / meta step.

    Cost: len(tasks) · steps learner steps, plus one meta-gradient per task.
    """
    learner = copy.deepcopy(meta_net)
    if side_by_side(method, settings):  # one batch of all the meta-batch's tasks per step
        support = StackedParts(tasks, 0, settings.tasks, repeat=steps)
        queries = StackedParts(tasks, 1, settings.tasks)
    else:
        support = TaskParts(tasks, 0, repeat=steps)  # `steps` steps on each support set
        queries = TaskParts(tasks, 1)
    rates = nn.ParameterList(nn.Parameter(torch.tensor(inner_lr)) for _ in learner.parameters())
    lrs = rates if method == "Meta-SGD" else [inner_lr] * len(rates)
    optimizer = torch.optim.SGD([{"params": [p], "lr": r}
                                 for p, r in zip(learner.parameters(), lrs)])
    prox = settings.imaml_lambda if method == "iMAML" else 0.0
    levels = [adapt_level(method, learner, optimizer, support, loss, steps, prox),
              meta_level(method, meta_net, queries, loss, settings)]
    if method == "Meta-SGD":
        @mlo.level(module=rates, optimizer=torch.optim.Adam(rates.parameters(),
                                                            lr=settings.outer_lr),
                   data=queries, hypergrad="itd", tasks=settings.tasks, name="rates")
        def learned_rates(batch, adapt):
            return loss(adapt(batch[0]), batch[1])
        levels.append(learned_rates)
    program = mlo.Program(*levels)
    start = time.perf_counter()
    program.run(len(support), progress=False)
    seconds = (time.perf_counter() - start) * settings.tasks / len(tasks)  # per meta step
    return (list(rates) if method == "Meta-SGD" else None), seconds


def adapted(net, rates, inner_lr, steps, support, loss):
    """Return θ_T: `steps` SGD steps from `net`'s parameters on a support set (rates: Meta-SGD)."""
    theta = {k: p.detach() for k, p in net.named_parameters()}
    lrs = [float(r.detach()) for r in rates] if rates is not None else [inner_lr] * len(theta)
    x, y = support
    for _ in range(steps):
        theta = {k: t.requires_grad_() for k, t in theta.items()}
        grads = torch.autograd.grad(loss(functional_call(net, theta, (x,)), y),
                                    list(theta.values()))
        theta = {k: (t - lr * g).detach() for (k, t), g, lr in zip(theta.items(), grads, lrs)}
    return theta
