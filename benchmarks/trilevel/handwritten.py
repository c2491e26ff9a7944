"""Hand-written three-level program with torch.autograd, no library.

The reweight hypergradient is one chain of best-response VJPs, right to left: the two paths
share the pretrain VJP, so the finetune VJP's output is added to ∂C_r/∂θ_p first and the
pretrain VJP runs once (Betty runs it once per path). Each VJP is, per method:

- aid_fd, the exact −ξ ∂²f/∂φ∂θ · v (ξ = that level's learning rate), written for each cost's
  shape: θ_p enters finetune's cost only through (μ/2)‖θ_f − θ_p‖², whose mixed derivative is −μI,
  so finetune's product is ξ_f μ v with no pass at all; ψ enters pretrain's cost only through the
  weights of the detached losses, so pretrain's product is the reweighting program's forward-mode
  pass (`reweight.handwritten.weighted_mixed_product`);
- aid_fd_central, the central difference of ∇_outer f along v, with forward-only perturbed passes;
- aid_cg, CG on that level's Hessian, reusing its gradient graph for every Hessian-vector product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import linalg
from ..reweight.handwritten import weighted_mixed_product
from . import common

UNSUPPORTED: dict[str, str] = {}


class Runner:
    def __init__(self, config: common.Config):
        self.config = config
        self.source, self.target, self.val, _ = common.data(config)
        pre, fine, wnet = common.modules(config)
        self.theta_p = [p.detach().clone().requires_grad_() for p in pre.parameters()]
        self.theta_f = [p.detach().clone().requires_grad_() for p in fine.parameters()]
        self.psi = [p.detach().clone().requires_grad_() for p in wnet.parameters()]
        self.optimizer = torch.optim.Adam(self.psi, lr=config.outer_lr)
        self.steps = 0

    def pretrain_cost(self, theta_p, psi, batch):
        x, y = batch
        losses = F.cross_entropy(common.mlp(theta_p, x), y, reduction="none")
        return (common.weights(psi, losses.detach()) * losses).mean()

    def finetune_cost(self, theta_f, theta_p, batch):
        x, y = batch
        return (F.cross_entropy(common.mlp(theta_f, x), y)
                + common.proximal(self.config, theta_f, theta_p))

    def step(self):
        config = self.config
        source = self.source[self.steps % len(self.source)]
        target = self.target[self.steps % len(self.target)]
        val_x, val_y = self.val[self.steps % len(self.val)]
        self.steps += 1
        # pretrain and finetune steps: first order in their own parameters only
        with torch.no_grad():
            psi = [p.detach() for p in self.psi]
        grads = torch.autograd.grad(self.pretrain_cost(self.theta_p, psi, source), self.theta_p)
        with torch.no_grad():
            torch._foreach_add_(self.theta_p, grads, alpha=-config.pretrain_lr)
        theta_p = [t.detach() for t in self.theta_p]
        grads = torch.autograd.grad(self.finetune_cost(self.theta_f, theta_p, target),
                                    self.theta_f)
        with torch.no_grad():
            torch._foreach_add_(self.theta_f, grads, alpha=-config.finetune_lr)
        # reweight: g_ψ = J_pᵀ (v_p + J_fᵀ v_f)
        outer = (F.cross_entropy(common.mlp(self.theta_f, val_x), val_y)
                 + F.cross_entropy(common.mlp(self.theta_p, val_x), val_y))
        vs = torch.autograd.grad(outer, self.theta_f + self.theta_p)
        n = len(self.theta_f)
        v_f, v_p = vs[:n], vs[n:]
        u_p = [a + b for a, b in zip(v_p, self.finetune_vjp(v_f, target))]
        hypergrad = self.pretrain_vjp(u_p, source)
        for p, g in zip(self.psi, hypergrad):
            p.grad = g
        self.optimizer.step()

    def finetune_vjp(self, v, batch):
        """(dθ_f*/dθ_p)ᵀ v; for aid_fd −ξ_f ∂²f_f/∂θ_p∂θ_f · v = ξ_f μ v exactly."""
        config = self.config
        if config.method == "aid_fd":
            return [config.finetune_lr * config.proximal * t for t in v]
        return self.vjp(self.finetune_cost, self.theta_f, self.theta_p, v, batch,
                        config.finetune_lr)

    def pretrain_vjp(self, v, batch):
        """(dθ_p*/dψ)ᵀ v."""
        config = self.config
        if config.method == "aid_fd":
            return weighted_mixed_product(common.mlp, common.weights, self.theta_p, self.psi, v,
                                          batch, config.pretrain_lr)
        return self.vjp(self.pretrain_cost, self.theta_p, self.psi, v, batch, config.pretrain_lr)

    def vjp(self, cost, inner, outer, v, batch, lr):
        """(d inner*/d outer)ᵀ v for the level with cost(inner, outer, batch)."""
        config = self.config
        if config.method == "aid_fd_central":
            epsilon = config.r / torch.sqrt(sum((t * t).sum() for t in v))
            with torch.no_grad():
                plus = [t + epsilon * d for t, d in zip(inner, v)]
                minus = [t - epsilon * d for t, d in zip(inner, v)]
            grads = torch.autograd.grad(cost(plus, outer, batch) - cost(minus, outer, batch),
                                        outer)
            return [-lr / (2 * epsilon) * g for g in grads]
        gradient = torch.autograd.grad(cost(inner, outer, batch), inner, create_graph=True)
        u = linalg.cg(lambda w: torch.autograd.grad(gradient, inner, w, retain_graph=True),
                      v, config.iters)
        return [-m for m in torch.autograd.grad(gradient, outer, u)]

    def loss(self) -> float:
        return common.evaluate(self.config, self.theta_f)

    def outer_params(self):
        return self.psi


def make(config: common.Config) -> Runner:
    return Runner(config)
