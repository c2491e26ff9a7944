"""Meta-learning through the public DSL against hand-written float64 references.

MAML, FOMAML, iMAML and Meta-SGD are each written once by hand with torch.autograd (an explicit
inner loop from θ₀ = φ per task, meta-batches averaged) and once as an mlo program; the meta
parameters must agree to 1e-8 after several outer steps.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mlo

D = torch.float64
ALPHA, BETA, K = 0.3, 0.1, 3  # inner lr, outer lr, inner steps per task


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).to(D)


def make_tasks(n, seed=1):
    """n sinusoid tasks, each (support batch, query batch) of 6 points."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        amplitude, phase = 0.5 + 2 * torch.rand(1, generator=g, dtype=D), torch.rand(1, generator=g, dtype=D)
        points = [4 * torch.rand(6, 1, generator=g, dtype=D) - 2 for _ in range(2)]
        tasks.append(tuple((x, amplitude * torch.sin(x + phase)) for x in points))
    return tasks


def mse(model, params, batch):
    x, y = batch
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()


# -- hand-written references ---------------------------------------------------------------------

def adapt_by_hand(model, start, support, rates, second_order, prox=0.0, phi=None):
    theta = {k: t if t.requires_grad else t.clone().requires_grad_() for k, t in start.items()}
    for _ in range(K):
        loss = mse(model, theta, support)
        if prox:
            loss = loss + 0.5 * prox * sum(((theta[k] - phi[k]) ** 2).sum() for k in theta)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=second_order)
        theta = {k: t - rates[k] * g for (k, t), g in zip(theta.items(), grads)}
    return theta


def maml_by_hand(model, tasks, meta_batch, first_order=False):
    phi = {k: p.detach().clone() for k, p in model.named_parameters()}
    for start in range(0, len(tasks), meta_batch):
        total = {k: torch.zeros_like(t) for k, t in phi.items()}
        for support, query in tasks[start:start + meta_batch]:
            leaf = {k: t.clone().requires_grad_() for k, t in phi.items()}
            theta = adapt_by_hand(model, leaf, support, {k: ALPHA for k in phi}, not first_order)
            wrt = theta if first_order else leaf
            grads = torch.autograd.grad(mse(model, theta, query), list(wrt.values()))
            total = {k: total[k] + g / meta_batch for k, g in zip(phi, grads)}
        phi = {k: phi[k] - BETA * total[k] for k in phi}
    return phi


# -- the same programs in mlo ----------------------------------------------------------------------

def maml_program(tasks, meta_batch, hypergrad, prox=0.0):
    learner, meta_net = net(), net()
    support = [s for s, _ in tasks for _ in range(K)]  # one support batch, K steps on it

    @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=ALPHA),
               data=support, unroll=K)
    def adapt(batch, module, meta: mlo.Init):
        loss = mse_of(module, batch)
        if prox:
            loss = loss + 0.5 * prox * sum(((p - q) ** 2).sum() for p, q in
                                           zip(module.params.values(), meta.params.values()))
        return loss

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
               data=[q for _, q in tasks], hypergrad=hypergrad, tasks=meta_batch)
    def meta(batch, adapt):
        return mse_of(adapt, batch)

    return mlo.Program(adapt, meta), meta_net


def mse_of(handle, batch):
    x, y = batch
    return ((handle(x) - y) ** 2).mean()


def run(program, tasks):
    for _ in range(len(tasks) * K):
        program.step()


def assert_params_close(module, expected, atol=1e-8):
    for key, p in module.named_parameters():
        assert torch.allclose(p.detach(), expected[key], atol=atol, rtol=0), key


@pytest.mark.parametrize("meta_batch", [1, 3])
def test_maml_matches_the_hand_written_second_order_unroll(meta_batch):
    tasks = make_tasks(6)
    program, meta_net = maml_program(tasks, meta_batch, "itd")
    run(program, tasks)
    expected = maml_by_hand(net(), tasks, meta_batch)
    assert program.steps == {"adapt": 6 * K, "meta": 6 // meta_batch}
    assert_params_close(meta_net, expected)
    assert not torch.allclose(expected["0.weight"], maml_by_hand(net(), tasks, meta_batch, True)
                              ["0.weight"], atol=1e-6)  # second order differs from first order


@pytest.mark.parametrize("hypergrad", ["first_order", mlo.hypergrad.itd(first_order=True)])
def test_fomaml_matches_the_hand_written_first_order_update(hypergrad):
    tasks = make_tasks(6)
    program, meta_net = maml_program(tasks, 2, hypergrad)
    run(program, tasks)
    assert_params_close(meta_net, maml_by_hand(net(), tasks, 2, first_order=True))


def test_imaml_matches_the_implicit_gradient_of_the_proximal_cost():
    prox, tasks = 2.0, make_tasks(4)
    program, meta_net = maml_program(tasks, 2, mlo.hypergrad.aid_cg(iters=40), prox=prox)
    run(program, tasks)
    model = net()
    phi = {k: p.detach().clone() for k, p in model.named_parameters()}
    for start in (0, 2):
        total = {k: torch.zeros_like(t) for k, t in phi.items()}
        for support, query in tasks[start:start + 2]:
            theta = adapt_by_hand(model, phi, support, {k: ALPHA for k in phi}, False, prox, phi)
            theta = {k: t.detach() for k, t in theta.items()}
            # dθ*/dφ = λ (∇²f + λI)⁻¹ for the cost f(θ) + λ/2‖θ − φ‖², at the adapted θ
            flat = torch.cat([t.flatten() for t in theta.values()])
            hessian = torch.autograd.functional.hessian(
                lambda v: mse(model, unflatten(v, theta), support), flat)
            query_grad = torch.autograd.grad(
                mse(model, unflatten(flat.requires_grad_(), theta), query), flat)[0]
            step = prox * torch.linalg.solve(hessian + prox * torch.eye(len(flat), dtype=D),
                                             query_grad)
            total = {k: total[k] + g / 2 for k, g in unflatten(step, theta).items()}
        phi = {k: phi[k] - BETA * total[k] for k in phi}
    assert_params_close(meta_net, phi)


def unflatten(flat, like):
    out, i = {}, 0
    for key, t in like.items():
        out[key] = flat[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


def test_reptile_is_an_upper_cost_without_hypergrad():
    tasks = make_tasks(2)
    learner, meta_net = net(), net()

    @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=ALPHA),
               data=[s for s, _ in tasks for _ in range(K)], unroll=K)
    def adapt(batch, module, meta: mlo.Init):
        return mse_of(module, batch)

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.5))
    def meta(module, adapt):  # φ ← φ + ε(θ_T − φ)
        return sum(0.5 * ((p - q.detach()) ** 2).sum()
                   for p, q in zip(module.params.values(), adapt.params.values()))

    run(mlo.Program(adapt, meta), tasks)
    model, phi = net(), {k: p.detach().clone() for k, p in net().named_parameters()}
    for support, _ in tasks:
        theta = adapt_by_hand(model, phi, support, {k: ALPHA for k in phi}, False)
        phi = {k: phi[k] + 0.5 * (theta[k].detach() - phi[k]) for k in phi}
    assert_params_close(meta_net, phi)


def test_meta_sgd_learns_one_rate_per_parameter_tensor():
    tasks, gamma = make_tasks(4), 0.05
    learner, meta_net = net(), net()
    rates = nn.ParameterList(nn.Parameter(torch.tensor(ALPHA * (1 + i / 10), dtype=D))
                             for i in range(4))
    groups = [{"params": [p], "lr": r} for p, r in zip(learner.parameters(), rates)]

    @mlo.level(module=learner, optimizer=torch.optim.SGD(groups), unroll=K,
               data=[s for s, _ in tasks for _ in range(K)])
    def adapt(batch, module, meta: mlo.Init, inner_lr):
        return mse_of(module, batch)

    queries = [q for _, q in tasks]

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
               data=queries, hypergrad="itd", tasks=2)
    def meta(batch, adapt):
        return mse_of(adapt, batch)

    @mlo.level(module=rates, optimizer=torch.optim.SGD(rates.parameters(), lr=gamma),
               data=queries, hypergrad="itd", tasks=2)
    def inner_lr(batch, adapt):
        return mse_of(adapt, batch)

    program = mlo.Program(adapt, meta, inner_lr)
    assert program.graph.init == (("meta", "adapt"),)
    run(program, tasks)

    model = net()
    names = [k for k, _ in model.named_parameters()]
    phi = {k: p.detach().clone() for k, p in model.named_parameters()}
    alpha = {k: torch.tensor(ALPHA * (1 + i / 10), dtype=D) for i, k in enumerate(names)}
    for start in (0, 2):
        leaves = {**{("phi", k): t.clone().requires_grad_() for k, t in phi.items()},
                  **{("alpha", k): t.clone().requires_grad_() for k, t in alpha.items()}}
        total = {key: torch.zeros_like(t) for key, t in leaves.items()}
        for support, query in tasks[start:start + 2]:
            theta = adapt_by_hand(model, {k: leaves[("phi", k)] for k in names}, support,
                                  {k: leaves[("alpha", k)] for k in names}, True)
            grads = torch.autograd.grad(mse(model, theta, query), list(leaves.values()))
            total = {key: total[key] + g / 2 for key, g in zip(leaves, grads)}
        phi = {k: phi[k] - BETA * total[("phi", k)] for k in names}
        alpha = {k: alpha[k] - gamma * total[("alpha", k)] for k in names}
    assert_params_close(meta_net, phi)
    for rate, key in zip(rates, names):
        assert torch.allclose(rate.detach(), alpha[key], atol=1e-8, rtol=0)
    assert not torch.allclose(rates[0].detach(), torch.tensor(ALPHA, dtype=D), atol=1e-4)
