"""Reweighting in TorchOpt 0.7.3, as its examples write it.

aid_cg / aid_neumann: the classifier's unrolled SGD steps are the solver of a
`torchopt.diff.implicit.custom_root` whose optimality condition is ∇_θ f on the last batch; the
meta loss then backpropagates implicitly into the weight net. itd: `torchopt.MetaSGD` steps the
classifier differentiably, then `torchopt.stop_gradient` detaches it for the next outer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchopt
from torch.func import functional_call, grad

from ..torchopt_common import implicit
from . import common

UNSUPPORTED = {m: "TorchOpt has no identity-Hessian (DARTS) hypergradient, exact or by finite "
                  "differences" for m in ("aid_fd", "aid_fd_central")}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        self.train, self.meta, _ = common.data(config)
        self.net = common.classifier_module(config)
        self.wnet = common.weight_module(config)
        self.optimizer = common.outer_optimizer(config, self.wnet.parameters())
        self.names = [n for n, _ in self.net.named_parameters()]
        self.wnames = [n for n, _ in self.wnet.named_parameters()]
        self.inner_steps = self.outer_steps = 0
        if config.method == "itd":
            self.inner_optimizer = torchopt.MetaSGD(self.net, lr=config.inner_lr)
        else:
            self.solver = implicit(config, self.optimality, self.solve)

    def next_batch(self):
        batch = self.train[self.inner_steps % len(self.train)]
        self.inner_steps += 1
        return batch

    def inner_cost(self, theta, phi, x, y):
        logits = functional_call(self.net, dict(zip(self.names, theta)), (x,))
        losses = F.cross_entropy(logits, y, reduction="none")
        w = functional_call(self.wnet, dict(zip(self.wnames, phi)),
                            (losses.detach().unsqueeze(1),)).squeeze(1)
        return (w * losses).mean()

    # -- implicit differentiation: optimality condition and solver of custom_root
    def optimality(self, theta, phi, xs, ys):
        return grad(self.inner_cost, argnums=0)(theta, phi, xs[-1], ys[-1])

    def solve(self, theta, phi, xs, ys):
        theta = [t.detach().requires_grad_() for t in theta]
        with torch.enable_grad():
            for x, y in zip(xs, ys):
                grads = torch.autograd.grad(self.inner_cost(theta, phi, x, y), theta)
                with torch.no_grad():
                    torch._foreach_add_(theta, grads, alpha=-self.config.inner_lr)
        return tuple(t.detach() for t in theta)

    def step(self):
        config = self.config
        meta_x, meta_y = self.meta[self.outer_steps % len(self.meta)]
        self.outer_steps += 1
        phi = tuple(self.wnet.parameters())
        if config.method == "itd":
            for _ in range(config.unroll):
                x, y = self.next_batch()
                losses = F.cross_entropy(self.net(x), y, reduction="none")
                w = self.wnet(losses.detach().unsqueeze(1)).squeeze(1)
                self.inner_optimizer.step((w * losses).mean())
            outer = F.cross_entropy(self.net(meta_x), meta_y)
        else:
            batches = [self.next_batch() for _ in range(config.unroll)]
            xs, ys = tuple(b[0] for b in batches), tuple(b[1] for b in batches)
            theta = self.solver(tuple(p.detach() for p in self.net.parameters()), phi, xs, ys)
            with torch.no_grad():
                for p, t in zip(self.net.parameters(), theta):
                    p.copy_(t)
            outer = F.cross_entropy(functional_call(self.net, dict(zip(self.names, theta)),
                                                    (meta_x,)), meta_y)
        self.optimizer.zero_grad()
        outer.backward(inputs=list(phi))
        self.optimizer.step()
        if config.method == "itd":
            torchopt.stop_gradient(self.net)
            torchopt.stop_gradient(self.inner_optimizer)

    def loss(self) -> float:
        return common.evaluate(self.config, list(self.net.parameters()))

    def outer_params(self):
        return list(self.wnet.parameters())


def make(config: common.Config) -> Runner:
    return Runner(config)
