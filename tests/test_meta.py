"""Meta-learning through the public DSL against hand-written float64 references.

MAML, FOMAML, iMAML and Meta-SGD are each written once by hand with torch.autograd (an explicit
inner loop from θ₀ = φ per task, meta-batches averaged) and once as an mlo program; the meta
parameters must agree to 1e-8 after several outer steps.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlo

sys.path.insert(0, str(Path(__file__).parent))
from meta_tasks import (ALPHA, BETA, D, K, assert_params_close, make_tasks, mse,  # noqa: E402
                        mse_of, net, run)


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


def meta_sgd_program(tasks, gamma, hypergrad="itd"):
    """MAML with a learned SGD rate per parameter tensor (a third level, `inner_lr`)."""
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
               data=queries, hypergrad=hypergrad, tasks=2)
    def meta(batch, adapt):
        return mse_of(adapt, batch)

    @mlo.level(module=rates, optimizer=torch.optim.SGD(rates.parameters(), lr=gamma),
               data=queries, hypergrad=hypergrad, tasks=2)
    def inner_lr(batch, adapt):
        return mse_of(adapt, batch)

    return mlo.Program(adapt, meta, inner_lr), meta_net, rates


def test_meta_sgd_learns_one_rate_per_parameter_tensor():
    tasks, gamma = make_tasks(4), 0.05
    program, meta_net, rates = meta_sgd_program(tasks, gamma)
    assert program.graph.init == (("meta", "adapt"),)
    assert program._live == {"adapt": ("meta", "inner_lr")}  # one trajectory, two levels
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


def test_itd_differentiates_the_start_and_a_proximal_term_that_reads_it():
    prox, tasks = 0.7, make_tasks(2)
    program, meta_net = maml_program(tasks, 2, "itd", prox=prox)
    run(program, tasks)
    model = net()
    phi = {k: p.detach().clone() for k, p in model.named_parameters()}
    leaf = {k: t.clone().requires_grad_() for k, t in phi.items()}
    total = {k: torch.zeros_like(t) for k, t in phi.items()}
    for support, query in tasks:
        theta = adapt_by_hand(model, {k: t.view_as(t) for k, t in leaf.items()}, support,
                              {k: ALPHA for k in phi}, True, prox, leaf)
        grads = torch.autograd.grad(mse(model, theta, query), list(leaf.values()))
        total = {k: total[k] + g / 2 for k, g in zip(phi, grads)}
    assert_params_close(meta_net, {k: phi[k] - BETA * total[k] for k in phi})


def test_three_levels_with_an_init_edge():
    """top (λ, itd) learns through meta's solution; meta (φ, MAML) has the penalty λ/2‖φ‖²."""
    tasks, gamma = make_tasks(3), 0.2
    learner, meta_net = net(), net()
    lam = nn.Parameter(torch.tensor(0.1, dtype=D))
    check = make_tasks(3, seed=9)

    @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=ALPHA),
               data=[s for s, _ in tasks for _ in range(K)], unroll=K)
    def adapt(batch, module, meta: mlo.Init):
        return mse_of(module, batch)

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
               data=[q for _, q in tasks], hypergrad="itd")
    def meta(batch, module, adapt, top: mlo.Upper):
        return mse_of(adapt, batch) + 0.5 * top() * sum((p ** 2).sum() for p in
                                                      module.params.values())

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=gamma), hypergrad="itd",
               data=[q for _, q in check])
    def top(batch, meta):
        return mse_of(meta, batch)

    program = mlo.Program(adapt, meta, top)
    assert program.graph.order == ("adapt", "meta", "top")
    run(program, tasks)
    assert program.steps == {"adapt": 3 * K, "meta": 3, "top": 3}

    model, lam_ref = net(), torch.tensor(0.1, dtype=D)
    phi = {k: p.detach().clone() for k, p in model.named_parameters()}
    for (support, query), (_, val) in zip(tasks, check):
        leaf = {k: t.clone().requires_grad_() for k, t in phi.items()}
        theta = adapt_by_hand(model, leaf, support, {k: ALPHA for k in phi}, True)
        maml = torch.autograd.grad(mse(model, theta, query), list(leaf.values()))
        new_phi = {k: phi[k] - BETA * (g + lam_ref * phi[k]) for k, g in zip(phi, maml)}
        # top's ITD replays meta's step with adapt's solution held fixed: dφ₁/dλ = −β φ₀
        val_grad = torch.autograd.grad(mse(model, {k: t.requires_grad_() for k, t in
                                                   new_phi.items()}, val), list(new_phi.values()))
        lam_ref = lam_ref - gamma * sum((-BETA * phi[k] * g).sum() for k, g in zip(phi, val_grad))
        phi = {k: t.detach() for k, t in new_phi.items()}
    assert_params_close(meta_net, phi)
    assert torch.allclose(lam.detach(), lam_ref, atol=1e-8, rtol=0)
    assert not torch.allclose(lam_ref, torch.tensor(0.1, dtype=D), atol=1e-5)


@pytest.mark.parametrize("stop", [2, 4, 6, 7])  # in a window; in a meta-batch; at their ends
def test_resume_inside_a_window_and_a_meta_batch_continues_exactly(stop, tmp_path):
    tasks = make_tasks(4)
    reference, expected = maml_program(tasks, 2, "itd")
    run(reference, tasks)
    mlo.registry.clear()
    program, _ = maml_program(tasks, 2, "itd")
    for _ in range(stop):
        program.step()
    program.save(tmp_path / "maml.pt")  # read back with weights_only=True
    mlo.registry.clear()
    resumed, meta_net = maml_program(tasks, 2, "itd")
    resumed = mlo.Program.load(tmp_path / "maml.pt", *resumed.levels.values())
    for _ in range(len(tasks) * K - stop):
        resumed.step()
    for (key, p), q in zip(meta_net.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), key
    assert resumed.history == reference.history


def test_resume_keeps_the_learned_rates_in_the_lower_optimizer(tmp_path):
    tasks = make_tasks(4)
    reference, _, expected = meta_sgd_program(tasks, 0.05)
    run(reference, tasks)
    mlo.registry.clear()
    program, _, _ = meta_sgd_program(tasks, 0.05)
    for _ in range(7):
        program.step()
    program.save(tmp_path / "meta_sgd.pt")
    mlo.registry.clear()
    fresh, _, rates = meta_sgd_program(tasks, 0.05)
    resumed = mlo.Program.load(tmp_path / "meta_sgd.pt", *fresh.levels.values())
    groups = resumed.levels["adapt"].optimizer.param_groups
    assert all(group["lr"] is rate for group, rate in zip(groups, rates))
    for _ in range(len(tasks) * K - 7):
        resumed.step()
    for rate, value in zip(rates, expected):
        assert torch.equal(rate, value)


def test_itd_replays_each_step_with_the_learning_rate_it_used():
    """A scheduler changes the lr after each step; the window records it before the step."""
    w, lam = nn.Parameter(torch.ones(2, dtype=D)), nn.Parameter(torch.tensor([0.5, -1.0], dtype=D))
    optimizer = torch.optim.SGD([w], lr=0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    @mlo.level(module=w, optimizer=optimizer, scheduler=scheduler, unroll=2)
    def inner(module, outer):
        return 0.5 * ((module() - outer()) ** 2).sum()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=1.0), hypergrad="itd")
    def outer(inner):
        return 0.5 * (inner() ** 2).sum()

    program = mlo.Program(inner, outer)
    program.step()
    program.step()
    by_hand, start = torch.tensor([0.5, -1.0], dtype=D, requires_grad=True), torch.ones(2, dtype=D)
    theta = start
    for lr in (0.2, 0.1):
        theta = theta - lr * (theta - by_hand)
    expected = by_hand.detach() - torch.autograd.grad(0.5 * (theta ** 2).sum(), by_hand)[0]
    assert torch.allclose(lam.detach(), expected, atol=1e-12, rtol=0)


def test_hypergradient_descent_on_a_learning_rate_without_init():
    """The classic HPO case: the upper level is the inner SGD's lr, learned through 3 steps."""
    A = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=D)
    b, target = torch.tensor([1.0, -1.0], dtype=D), torch.tensor([0.2, 0.4], dtype=D)
    w, rate = nn.Parameter(torch.zeros(2, dtype=D)), nn.Parameter(torch.tensor(0.1, dtype=D))

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=rate), unroll=3)
    def inner(module, step_size):
        return 0.5 * module() @ A @ module() - b @ module()

    @mlo.level(module=rate, optimizer=torch.optim.SGD([rate], lr=0.05), hypergrad="itd")
    def step_size(inner):
        return 0.5 * ((inner() - target) ** 2).sum()

    program = mlo.Program(inner, step_size)
    for _ in range(6):
        program.step()
    theta, alpha = torch.zeros(2, dtype=D), torch.tensor(0.1, dtype=D)
    for _ in range(2):  # two outer steps, each through the 3 inner steps since the last
        leaf = alpha.clone().requires_grad_()
        for _ in range(3):
            theta = theta - leaf * (A @ theta - b)
        grad = torch.autograd.grad(0.5 * ((theta - target) ** 2).sum(), leaf)[0]
        alpha, theta = alpha - 0.05 * grad, theta.detach()
    assert torch.allclose(w.detach(), theta, atol=1e-12, rtol=0)
    assert torch.allclose(rate.detach(), alpha, atol=1e-12, rtol=0)


def test_reset_clears_the_optimizer_state():
    tasks = make_tasks(2)
    learner, meta_net = net(), net()
    optimizer = torch.optim.SGD(learner.parameters(), lr=ALPHA, momentum=0.9)

    @mlo.level(module=learner, optimizer=optimizer, data=[s for s, _ in tasks], unroll=1)
    def adapt(batch, module, meta: mlo.Init):
        return mse_of(module, batch)

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
               data=[q for _, q in tasks], hypergrad="itd")
    def meta(batch, adapt):
        return mse_of(adapt, batch)

    program = mlo.Program(adapt, meta)
    program.step()
    program.step()  # the second window: reset to φ, fresh momentum
    for p in learner.parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], p.grad)


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_a_task_with_a_non_finite_meta_gradient_spoils_its_meta_batch(on_nonfinite):
    """The tasks' gradients add up in .grad and are checked once, after the last task: a task
    whose meta-gradient is infinite (finite loss: √ at 0) makes the whole meta step skipped, or
    raises, as a check of every task would."""
    tasks = make_tasks(6)
    poisoned = {1}  # the second task of the first meta-batch
    learner, meta_net = net(), net()
    seen = []

    @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=ALPHA),
               data=[s for s, _ in tasks for _ in range(K)], unroll=K)
    def adapt(batch, module, meta: mlo.Init):
        return mse_of(module, batch)

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
               data=[q for _, q in tasks], hypergrad="itd", tasks=3)
    def meta(batch, adapt):
        task = len(seen)
        seen.append(task)
        loss = mse_of(adapt, batch)
        if task in poisoned:  # d√u/du at u = 0 is inf; the value stays finite
            loss = loss + torch.sqrt(0.0 * loss)
        return loss

    program = mlo.Program(adapt, meta, on_nonfinite=on_nonfinite)
    before = {k: p.detach().clone() for k, p in meta_net.named_parameters()}
    if on_nonfinite == "raise":
        with pytest.raises(mlo.errors.NonFiniteError, match="hypergradient"):
            run(program, tasks)
        return
    run(program, tasks[:3])  # the first meta-batch: skipped, φ unchanged
    assert program.skipped["meta"] == 1 and program.steps["meta"] == 1
    for key, p in meta_net.named_parameters():
        assert torch.equal(p.detach(), before[key])
    run(program, tasks[3:])  # the second is clean: applied
    assert program.skipped["meta"] == 1 and program.steps["meta"] == 2
    assert not all(torch.equal(p.detach(), before[k]) for k, p in meta_net.named_parameters())
