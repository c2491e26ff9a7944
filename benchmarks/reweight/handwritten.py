"""Hand-written reweighting: the mathematics written directly with torch.autograd, no library.

What makes it the speed limit:
- inner steps differentiate the classifier only; the weight net runs under no_grad there;
- aid_fd needs −ξ ∂²f/∂φ∂θ · v = −ξ ∂/∂φ mean_i w_φ(ℓ_i) (∇ℓ_i · v), because φ enters f only
  through the weights of the detached losses: one forward-mode pass (dual tensors of
  `torch.autograd.forward_ad` carrying v, no graph) gives ℓ_i and ∇ℓ_i · v together, and one
  backward runs through the tiny weight net. Measured for one hypergradient on this CPU (one
  thread): on 784-1024-1024-10, batch 128, it took 30 ms against 43 ms for the double backward of
  the retained gradient graph (mlo's general scheme) and for a double VJP of the per-sample
  losses, 32 ms for `torch.func.jvp`, and 28 ms for the central difference; on 784-256-10 every
  exact scheme took 6.0-7.4 ms with dual tensors fastest; on the quick 784-64-10, batch 32, dual
  tensors took 0.39 ms against 0.49 (double backward) and 0.71 ms (`torch.func.jvp`, whose
  per-call overhead shows there). The baseline uses dual tensors;
- aid_fd_central needs ∇_φ f(θ ± εv, φ) only, and ℓ(θ ± εv) enters f as a constant for φ, so the
  two classifier passes are forward-only (no graph) and the one backward runs through the tiny
  weight net on f(θ+εv) − f(θ−εv);
- aid_cg / aid_neumann build the gradient graph g = ∇_θ f once (create_graph) and reuse it for
  every Hessian-vector product and for the final mixed product ∂²f/∂φ∂θ · u;
- itd records exactly the unrolled steps it differentiates.

The Hessian-vector products use torch.autograd.grad on the retained gradient graph with only the
classifier as inputs. Measured on this CPU (784-256-10 and 784-1024-1024-10, 3 CG iterations), a
torch.func.vjp of the gradient map (which returns the weight-net cotangent on every product too)
was 5-60% slower and forward-over-reverse (torch.func.jvp of torch.func.grad, recomputing the
forward each product) 50-250% slower, so the baseline uses the fastest of the three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .. import linalg
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        self.train, self.meta, _ = common.data(config)
        self.theta = [p.detach().clone().requires_grad_()
                      for p in common.classifier_module(config).parameters()]
        self.phi = [p.detach().clone().requires_grad_()
                    for p in common.weight_module(config).parameters()]
        self.optimizer = common.outer_optimizer(config, self.phi)
        self.inner_steps = 0
        self.outer_steps = 0

    # -- the program's two costs
    def inner_cost(self, theta, phi, batch):
        x, y = batch
        losses = F.cross_entropy(common.mlp(theta, x), y, reduction="none")
        return (common.weights(phi, losses.detach()) * losses).mean()

    def next_batch(self):
        batch = self.train[self.inner_steps % len(self.train)]
        self.inner_steps += 1
        return batch

    def sgd_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(common.mlp(self.theta, x), y, reduction="none")
        with torch.no_grad():
            w = common.weights(self.phi, losses)
        grads = torch.autograd.grad((w * losses).mean(), self.theta)
        with torch.no_grad():
            torch._foreach_add_(self.theta, grads, alpha=-self.config.inner_lr)

    # -- one outer step
    def step(self):
        config = self.config
        meta_x, meta_y = self.meta[self.outer_steps % len(self.meta)]
        self.outer_steps += 1
        if config.method == "itd":
            hypergrad = self.itd(meta_x, meta_y)
        else:
            for _ in range(config.unroll):
                batch = self.next_batch()
                self.sgd_step(batch)
            v = torch.autograd.grad(F.cross_entropy(common.mlp(self.theta, meta_x), meta_y),
                                    self.theta)
            if config.method == "aid_fd":
                hypergrad = self.mixed_product(batch, v)
            elif config.method == "aid_fd_central":
                hypergrad = self.finite_difference(batch, v)
            else:
                hypergrad = self.implicit(batch, v)
        for p, g in zip(self.phi, hypergrad):
            p.grad = g
        self.optimizer.step()

    def mixed_product(self, batch, v):
        return weighted_mixed_product(common.mlp, common.weights, self.theta, self.phi, v, batch,
                                      self.config.inner_lr)

    def finite_difference(self, batch, v):
        config = self.config
        x, y = batch
        epsilon = config.r / torch.sqrt(sum((t * t).sum() for t in v))
        with torch.no_grad():
            plus = F.cross_entropy(common.mlp([t + epsilon * d for t, d in zip(self.theta, v)], x),
                                   y, reduction="none")
            minus = F.cross_entropy(common.mlp([t - epsilon * d for t, d in zip(self.theta, v)], x),
                                    y, reduction="none")
        difference = (common.weights(self.phi, plus) * plus
                      - common.weights(self.phi, minus) * minus).mean()
        grads = torch.autograd.grad(difference, self.phi)
        scale = -config.inner_lr / (2 * epsilon)
        return [scale * g for g in grads]

    def implicit(self, batch, v):
        config = self.config
        gradient = torch.autograd.grad(self.inner_cost(self.theta, self.phi, batch), self.theta,
                                       create_graph=True)

        def hvp(u):
            return torch.autograd.grad(gradient, self.theta, u, retain_graph=True)

        if config.method == "aid_cg":
            u = linalg.cg(hvp, v, config.iters)
        else:
            u = linalg.neumann(hvp, v, config.iters, config.inner_lr)
        mixed = torch.autograd.grad(gradient, self.phi, u)
        return [-m for m in mixed]

    def itd(self, meta_x, meta_y):
        config = self.config
        theta = self.theta
        for _ in range(config.unroll):
            batch = self.next_batch()
            grads = torch.autograd.grad(self.inner_cost(theta, self.phi, batch), theta,
                                        create_graph=True)
            theta = [t - config.inner_lr * g for t, g in zip(theta, grads)]
        outer = F.cross_entropy(common.mlp(theta, meta_x), meta_y)
        hypergrad = torch.autograd.grad(outer, self.phi)
        self.theta = [t.detach().requires_grad_() for t in theta]
        return hypergrad

    def loss(self) -> float:
        return common.evaluate(self.config, self.theta)

    def outer_params(self):
        return self.phi


def weighted_mixed_product(net, weights, theta, phi, v, batch, xi):
    """Return −ξ ∂²f/∂φ∂θ · v for f = mean_i w_φ(ℓ_i.detach()) ℓ_i, ℓ_i = CE(net(θ, x_i), y_i).

    ∇_θ f = mean_i w_φ(ℓ_i) ∇ℓ_i, so the product is −ξ ∂/∂φ mean_i w_φ(ℓ_i) (∇ℓ_i · v): one
    forward-mode pass for the per-sample directional derivatives, one backward to φ.
    """
    x, y = batch
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t.detach(), d) for t, d in zip(theta, v)]
        values, directional = forward_ad.unpack_dual(
            F.cross_entropy(net(duals, x), y, reduction="none"))
    grads = torch.autograd.grad((weights(phi, values) * directional).mean(), phi)
    return [-xi * g for g in grads]


def make(config: common.Config) -> Runner:
    return Runner(config)
