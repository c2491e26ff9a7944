"""Hypergradients through the public DSL, against closed forms: bilevel and the trilevel chain."""

import gc
import math
import warnings

import pytest
import torch

import mlo

D = torch.float64


@pytest.fixture(autouse=True)
def _clean_registry():
    mlo.registry.clear()
    yield
    mlo.registry.clear()


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, n, generator=g, dtype=D)
    return r @ r.T / n + torch.eye(n, dtype=D)


def vec(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def param(t):
    return torch.nn.Parameter(t.clone())


def test_one_step_moves_upper_by_lr_times_exact_hypergradient():
    A, B, c = spd(4, 0), vec(4, 3, seed=1), vec(4, seed=2)
    w, lam = param(vec(4, seed=3)), param(vec(3, seed=4))

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.05))
    def inner(module, outer):
        return 0.5 * module() @ A @ module() - module() @ B @ outer()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.3),
               hypergrad=mlo.hypergrad.aid_cg(iters=10))
    def outer(inner):
        return 0.5 * ((inner() - c) ** 2).sum()

    before = lam.detach().clone()
    mlo.Program(inner, outer).step()
    exact = B.T @ torch.linalg.solve(A, w.detach() - c)  # at the inner parameters after its step
    assert torch.allclose(lam.detach(), before - 0.3 * exact, atol=1e-12, rtol=0)


class Chain:
    """pretrain(p; reads λ) -> finetune(q; reads p) -> reweight(λ; reads q and p): two paths."""

    def __init__(self, method, pretrain_unroll=1):
        self.Ap, self.Aq = spd(4, 10), spd(3, 11)
        self.B, self.C = vec(4, 2, seed=12), vec(3, 4, seed=13)
        self.c, self.d = vec(3, seed=14), vec(4, seed=15)
        self.lam0 = vec(2, seed=16)
        self.lrp, self.lrq = 0.1, 0.2
        p0 = torch.linalg.solve(self.Ap, self.B @ self.lam0)  # start at the exact solutions, so
        q0 = torch.linalg.solve(self.Aq, self.C @ p0)         # the lower steps leave them there
        self.p, self.q, self.lam = param(p0), param(q0), param(self.lam0)
        Ap, Aq, B, C, c, d = self.Ap, self.Aq, self.B, self.C, self.c, self.d

        @mlo.level(module=self.p, optimizer=torch.optim.SGD([self.p], lr=self.lrp),
                   unroll=pretrain_unroll)
        def pretrain(module, reweight):
            return 0.5 * module() @ Ap @ module() - module() @ B @ reweight()

        @mlo.level(module=self.q, optimizer=torch.optim.SGD([self.q], lr=self.lrq))
        def finetune(module, pretrain):
            return 0.5 * module() @ Aq @ module() - module() @ C @ pretrain()

        @mlo.level(module=self.lam, optimizer=torch.optim.SGD([self.lam], lr=1.0), hypergrad=method)
        def reweight(finetune, pretrain):
            return 0.5 * ((finetune() - c) ** 2).sum() + 0.5 * ((pretrain() - d) ** 2).sum()

        self.program = mlo.Program(pretrain, finetune, reweight)

    def upper_cost(self, p, q):
        return 0.5 * ((q - self.c) ** 2).sum() + 0.5 * ((p - self.d) ** 2).sum()

    def exact(self):
        lam = self.lam0.clone().requires_grad_()
        p = torch.linalg.solve(self.Ap, self.B @ lam)
        q = torch.linalg.solve(self.Aq, self.C @ p)
        return torch.autograd.grad(self.upper_cost(p, q), lam)[0]

    def unrolled(self, pretrain_steps=1):
        """The gradient through `pretrain_steps` SGD steps of pretrain and one of finetune."""
        lam = self.lam0.clone().requires_grad_()
        p = self.p.detach()
        for _ in range(pretrain_steps):
            p = p - self.lrp * (self.Ap @ p - self.B @ lam)
        q = self.q.detach() - self.lrq * (self.Aq @ self.q.detach() - self.C @ p)
        return torch.autograd.grad(self.upper_cost(p, q), lam)[0]

    def hypergradient(self, steps=1):
        for _ in range(steps):
            self.program.step()
        return self.lam0 - self.lam.detach()


def test_chain_graph_has_two_paths():
    paths = Chain("aid_cg").program.graph.paths["reweight"]
    assert set(paths) == {("reweight", "pretrain", "finetune", "reweight"),
                          ("reweight", "pretrain", "reweight")}


@pytest.mark.parametrize("method,atol", [
    (mlo.hypergrad.aid_cg(iters=20), 1e-10),
    (mlo.hypergrad.aid_neumann(iters=400), 1e-8),
])
def test_chain_implicit_methods_match_nested_solves(method, atol):
    chain = Chain(method)
    assert torch.allclose(chain.hypergradient(), chain.exact(), atol=atol, rtol=0)


@pytest.mark.parametrize("method", ["aid_fd", "sama", "itd"])
def test_chain_one_step_methods_match_one_step_unroll(method):
    chain = Chain(method)
    expected = chain.unrolled()
    assert torch.allclose(chain.hypergradient(), expected, atol=1e-9, rtol=0)
    assert not torch.allclose(expected, chain.exact(), atol=1e-3)  # a different quantity


def test_chain_itd_replays_every_step_of_the_window():
    chain = Chain("itd", pretrain_unroll=2)
    expected = chain.unrolled(pretrain_steps=2)
    hypergradient = chain.hypergradient(steps=2)
    assert chain.program.steps == {"pretrain": 2, "finetune": 1, "reweight": 1}
    assert torch.allclose(hypergradient, expected, atol=1e-10, rtol=0)


def test_chain_first_order_leaves_upper_unchanged():
    chain = Chain("first_order")
    assert torch.equal(chain.hypergradient(), torch.zeros(2, dtype=D))


def test_itd_memory_does_not_grow_over_outer_steps():
    w, lam = param(torch.zeros(20, dtype=D)), param(torch.ones(20, dtype=D))
    x = [vec(8, 20, seed=i) for i in range(3)]

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.01, momentum=0.5), data=x, unroll=2)
    def inner(batch, module, outer):
        return ((batch @ module()) ** 2).mean() + (outer() * module() ** 2).sum()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.01), hypergrad="itd")
    def outer(inner):
        return ((inner() - 1) ** 2).sum()

    program = mlo.Program(inner, outer)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    for _ in range(100):
        program.step()
    early = live_tensors()
    for _ in range(900):
        program.step()
    assert program.steps["outer"] == 500
    assert live_tensors() <= early
    assert all(window.steps <= 2 for window in program._windows.values())


@pytest.mark.parametrize("method", ["aid_fd", "aid_cg", "itd"])
def test_hypergradient_passes_record_no_graph_for_levels_not_differentiated(method):
    w, lam, aux = param(vec(3, seed=1)), param(vec(3, seed=2)), param(vec(3, seed=3))
    tracked = []

    @mlo.level(module=aux, optimizer=torch.optim.SGD([aux], lr=0.1))
    def helper(module):
        return ((module() - 1) ** 2).sum()

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def inner(module, outer, helper):
        tracked.append(helper().requires_grad)
        return ((module() - outer() * helper()) ** 2).sum()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad=method)
    def outer(inner):
        return (inner() ** 2).sum()

    program = mlo.Program(helper, inner, outer)
    program.step()
    if program._live:  # itd: inner's real step records the unroll, with helper frozen in it
        assert method == "itd" and not any(tracked)
        return
    assert tracked[0] is True  # inner's own step: the live helper, never differentiated
    assert len(tracked) > 1 and not any(tracked[1:])  # hypergradient passes: detached


@pytest.mark.parametrize("method", ["aid_fd", "aid_cg", "itd", "sama"])
def test_lower_cost_returning_metrics_works_under_every_method(method):
    w, lam = param(vec(3, seed=1)), param(vec(3, seed=2))

    @mlo.level(module=w, optimizer=torch.optim.Adam([w], lr=0.1))
    def inner(module, outer):
        error = module() - outer()
        return {"loss": (error ** 2).sum(), "max_error": error.abs().max()}

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad=method)
    def outer(inner):
        return ((inner() - 1) ** 2).sum()

    program = mlo.Program(inner, outer)
    before = lam.detach().clone()
    program.step()
    assert "max_error" in program.history["inner"][0]
    assert not torch.equal(lam.detach(), before)


@pytest.mark.parametrize("method", ["aid_fd", "aid_cg", "itd", "sama"])
def test_batchnorm_lower_level_works_and_hypergradient_passes_leave_its_statistics(method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 1))
    scale = torch.nn.Parameter(torch.ones(4))
    x = torch.randn(16, 4)

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    def inner(module, outer):
        return ((module(x * outer()) - 1) ** 2).mean()

    @mlo.level(module=scale, optimizer=torch.optim.SGD([scale], lr=0.1), hypergrad=method)
    def outer(inner):
        return (inner(x) ** 2).mean()

    program = mlo.Program(inner, outer)
    for _ in range(3):
        program.step()
    assert int(net[1].num_batches_tracked) == 6  # 3 inner steps + 3 outer forward passes
    assert not torch.equal(scale.detach(), torch.ones(4))


@pytest.mark.parametrize("method", ["aid_cg", "aid_neumann", "aid_fd", "itd"])
def test_a_middle_level_whose_cost_reads_its_parameters_only_through_a_solution_is_refused(method):
    """A middle level's cost that reads its own parameters only through the level below's
    solution has a constant gradient in them: the implicit methods' best response of it is
    undefined (zero Hessian, zero mixed product), and its replayed steps never move, so the
    hypergradient through it would be zero."""
    mlo.registry.clear()
    w, scale, shift = (torch.nn.Parameter(torch.full((3,), v)) for v in (0.0, 1.0, 0.5))
    x, y = torch.arange(3.0), torch.ones(3)

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), name="bottom")
    def bottom(module, middle):
        return ((module() * middle() - x) ** 2).sum()

    @mlo.level(module=scale, optimizer=torch.optim.SGD([scale], lr=0.1), hypergrad="aid_cg",
               name="middle")
    def middle(bottom, top: mlo.Upper):
        return ((bottom() - y - top()) ** 2).sum()  # no direct read of its own parameters

    @mlo.level(module=shift, optimizer=torch.optim.SGD([shift], lr=0.1), hypergrad=method,
               name="top")
    def top(middle):
        return ((middle() - 2.0) ** 2).sum()

    program = mlo.Program(bottom, middle, top)
    with pytest.raises(mlo.errors.GraphError, match=r"level 'top' \(hypergrad=.*\) differentiates "
                       r"the solution of 'middle'.*depends neither on 'middle''s own parameters"):
        for _ in range(3):
            program.step()


def two_uppers(method, unroll=1):
    """f(w) = ½ e^a (w − b)² steered by a (`upper_a`) and b (`upper_b`), both by `method`."""
    mlo.registry.clear()
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    a = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.2], dtype=torch.float64))

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), name="lower", unroll=unroll)
    def lower(module, upper_a, upper_b):
        return (0.5 * upper_a().exp() * (module() - upper_b()) ** 2).sum()

    @mlo.level(module=a, optimizer=torch.optim.SGD([a], lr=0.5), hypergrad=method,
               name="upper_a")
    def upper_a(lower):
        return (0.5 * (lower() - 2.0) ** 2).sum()

    @mlo.level(module=b, optimizer=torch.optim.SGD([b], lr=0.5), hypergrad=method,
               name="upper_b")
    def upper_b(lower):
        return (0.5 * (lower() + 1.0) ** 2).sum()

    return mlo.Program(lower, upper_a, upper_b), (w, a, b)


@pytest.mark.parametrize("method", [mlo.hypergrad.itd(recompute=True),
                                    mlo.hypergrad.itd(recompute=True, keep_every=2)])
def test_two_itd_uppers_replay_the_step_with_the_values_it_read(method):
    """Two upper levels steer one lower level, f(w) = ½ e^a (w − b)²; one SGD step gives
    w₁ = w₀ − η e^a (w₀ − b). Whichever upper steps first, the other's replay of that step must
    read the first one's value at the step (a₀ or b₀), not its new one: closed form
    ∂w₁/∂a = −η e^a₀ (w₀ − b₀), ∂w₁/∂b = η e^a₀."""
    lr, w0, a0, b0, ta, tb = 0.1, 1.0, 0.5, 0.2, 2.0, -1.0
    program, (w, a, b) = two_uppers(method)
    program.step()
    w1 = w0 - lr * math.exp(a0) * (w0 - b0)
    assert a.grad.item() == pytest.approx((w1 - ta) * -lr * math.exp(a0) * (w0 - b0), rel=1e-12)
    assert b.grad.item() == pytest.approx((w1 - tb) * lr * math.exp(a0), rel=1e-12)
    assert a.item() != a0 and b.item() != b0  # both stepped in this global step


@pytest.mark.parametrize("method", ["itd", mlo.hypergrad.itd(recompute=True)])
def test_a_checkpoint_inside_a_window_keeps_the_values_its_steps_read(method):
    """Saved after the first of two lower steps, a program resumes to the same parameters as an
    uninterrupted one: the window keeps the other upper's values its steps read."""
    reference, params = two_uppers(method, unroll=2)
    for _ in range(6):
        reference.step()
    expected = [p.detach().clone() for p in params]
    program, _ = two_uppers(method, unroll=2)
    for _ in range(3):
        program.step()
    state = program.state_dict()
    resumed, params = two_uppers(method, unroll=2)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step()
    for ours, theirs in zip(params, expected):
        assert torch.equal(ours.detach(), theirs)
