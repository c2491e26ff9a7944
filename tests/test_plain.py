"""mlo.plain: a level that only follows its own gradient steps through the plain path, with the very
numbers, history, skips and scheduler of the general path; every other level keeps the general
path."""

import math

import pytest
import torch
import torch.nn.functional as F

import mlo


def _program(optimizer, scheduler=False, metrics=False):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    lam = torch.nn.Parameter(torch.tensor([-2.0]))
    data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(3)]
    opt = optimizer(net.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    poison = []  # set during one global step: the inner loss is NaN there

    @mlo.level(module=net, optimizer=opt, data=data, scheduler=sched, unroll=3)
    def inner(batch, module, outer):
        x, y = batch
        loss = F.mse_loss(module(x), y) + outer().exp().squeeze() * sum((p ** 2).sum()
                                                              for p in module.parameters())
        if poison:
            loss = loss * float("nan")
        return {"loss": loss, "fit": F.mse_loss(module(x), y)} if metrics else loss

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), data=data,
               hypergrad="aid_cg")
    def outer(batch, inner):
        x, y = batch
        return F.mse_loss(inner(x), y)

    program = mlo.Program(inner, outer, on_nonfinite="skip")
    program.poison = poison
    return program, net, opt


CASES = [
    dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05)),
    dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), scheduler=True),
    dict(optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2), metrics=True),
    dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05), nonfinite_at=4),
]


@pytest.mark.parametrize("case", CASES)
def test_plain_steps_equal_the_general_path_bit_for_bit(case):
    options = {k: v for k, v in case.items() if k != "nonfinite_at"}
    plain, plain_net, plain_opt = _program(**options)
    usual, usual_net, usual_opt = _program(**options)
    assert set(plain._plain) == {"inner"}  # the upper level has a hypergradient: general path
    usual._plain = {}  # every level through Program._step_level
    for step in range(10):
        for program in (plain, usual):
            program.poison[:] = [True] if step == case.get("nonfinite_at") else []
        assert plain.step() == usual.step() or math.isnan(plain.history["inner"][-1]["loss"])
    for p, q in zip(plain_net.parameters(), usual_net.parameters()):
        assert torch.equal(p, q)
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    for p, q in zip(plain_net.parameters(), usual_net.parameters()):
        for key, value in usual_opt.state[q].items():
            assert torch.equal(torch.as_tensor(plain_opt.state[p][key]), torch.as_tensor(value))
    assert plain_opt.param_groups[0]["lr"] == usual_opt.param_groups[0]["lr"]
    assert plain.skipped == usual.skipped
    assert plain.steps == usual.steps
    for name in ("inner", "outer"):
        a, b = plain.history[name], usual.history[name]
        assert len(a) == len(b) and all(
            x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x)
            for x, y in zip(a, b))
    if case.get("nonfinite_at"):
        assert plain.skipped["inner"] == 1


def test_levels_with_more_to_do_take_the_general_path():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    lam = torch.nn.Parameter(torch.zeros(1))
    data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(2)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=data,
               grad_accum=2)
    def accumulated(batch, module, outer):
        x, y = batch
        return F.mse_loss(module(x), y) + outer().exp() * module.weight.pow(2).sum()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), data=data, hypergrad="itd")
    def outer(batch, accumulated):
        x, y = batch
        return F.mse_loss(accumulated(x), y)

    program = mlo.Program(accumulated, outer)
    assert program._plain == {}  # grad_accum (and an itd window) on the lower, a method on the upper
