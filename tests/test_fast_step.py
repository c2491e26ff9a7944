"""mlo.fast_step: a level's optimizer step without torch.optim's wrapper gives the very numbers of
`optimizer.step()`, and the wrapper runs wherever something could observe its absence."""

import pytest
import torch

import mlo
from mlo import fast_step
from torch.optim.optimizer import register_optimizer_step_pre_hook

OPTIMIZERS = [
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
]


def _params(seed):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_same_numbers_as_optimizer_step_bit_for_bit(make):
    usual, fast = _params(0), _params(0)
    opt_usual, opt_fast = make(usual), make(fast)
    assert fast_step._unwrapped(opt_fast) is not None  # the fast path is taken
    for step in range(5):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in usual]
        for p, q, g in zip(usual, fast, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:  # a parameter without a gradient is skipped
            usual[1].grad = fast[1].grad = None
        opt_usual.step()
        fast_step.step(opt_fast)
        for p, q in zip(usual, fast):
            assert torch.equal(p, q)
    for p, q in zip(usual, fast):
        for key, value in opt_usual.state[p].items():
            assert torch.equal(torch.as_tensor(opt_fast.state[q][key]), torch.as_tensor(value))


def test_the_wrapper_runs_where_it_is_observed():
    params = _params(0)
    seen = []
    optimizer = torch.optim.SGD(params, lr=0.1)
    handle = optimizer.register_step_pre_hook(lambda *args: seen.append("own"))
    assert fast_step._unwrapped(optimizer) is None
    handle.remove()
    handle = register_optimizer_step_pre_hook(
        lambda *args: seen.append("global"))
    assert fast_step._unwrapped(optimizer) is None
    for p in params:
        p.grad = torch.ones_like(p)
    fast_step.step(optimizer)
    handle.remove()
    assert seen == ["global"] and fast_step._unwrapped(optimizer) is not None
    with torch.profiler.profile():
        assert fast_step._unwrapped(optimizer) is None
    torch.optim.lr_scheduler.StepLR(optimizer, 1)  # wraps the instance's step
    assert fast_step._unwrapped(optimizer) is None
    assert fast_step._unwrapped(torch.optim.SGD(_params(1), lr=0.1, differentiable=True)) is None

    class Custom(torch.optim.SGD):
        pass
    assert fast_step._unwrapped(Custom(_params(1), lr=0.1)) is None


def test_a_program_steps_as_with_optimizer_step():
    results = []
    for fast in (True, False):
        mlo.registry.clear()
        torch.manual_seed(0)
        w, lam = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.zeros(5))
        seen = []

        @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), unroll=3)
        def inner(module, outer):
            return ((module() - 1) ** 2).sum() + (outer().exp() * module() ** 2).sum()

        @mlo.level(module=lam, optimizer=torch.optim.Adam([lam], lr=0.1), hypergrad="aid_cg")
        def outer(inner):
            return (inner() ** 2).sum()

        program = mlo.Program(inner, outer)
        hook = None if fast else register_optimizer_step_pre_hook(
            lambda *args: seen.append(1))
        program.run(9, progress=False)
        if hook is not None:
            hook.remove()
            assert len(seen) == 9 + 3  # the usual path ran: every step went through the hooks
        results.append((w.detach().clone(), lam.detach().clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))
