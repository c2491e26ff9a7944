"""Live unrolls (mlo/live.py): a learner's real steps record the graph its ITD upper levels
differentiate; the result must be the replay's."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlo

sys.path.insert(0, str(Path(__file__).parent))
from meta_tasks import (ALPHA, BETA, D, K, assert_params_close, make_tasks,  # noqa: E402
                        mse_of, net, run)


@pytest.mark.parametrize("inner,accumulate", [
    (lambda params: torch.optim.SGD(params, lr=ALPHA, momentum=0.9, weight_decay=0.01), 1),
    (lambda params: torch.optim.Adam(params, lr=0.05), 1),
    (lambda params: torch.optim.SGD(params, lr=ALPHA), 2),  # two query batches per task
])
def test_live_unroll_equals_the_replay(inner, accumulate):
    """The learner's real steps record MAML's graph (no replay); a replay gives the same."""
    tasks, results = make_tasks(4), []
    for live in (True, False):
        mlo.registry.clear()
        learner, meta_net = net(), net()
        optimizer = inner(learner.parameters())

        @mlo.level(module=learner, optimizer=optimizer, unroll=K,
                   data=[s for s, _ in tasks for _ in range(K)])
        def adapt(batch, module, meta: mlo.Init):
            return mse_of(module, batch)

        @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
                   data=[q for t in tasks for q in t], hypergrad="itd", tasks=2,
                   grad_accum=accumulate)
        def meta(batch, adapt):
            return mse_of(adapt, batch)

        program = mlo.Program(adapt, meta)
        assert program._live == {"adapt": ("meta",)}
        if not live:
            program._live.clear()
            program._live_uppers.clear()
        run(program, tasks[:3])  # ends inside a meta-batch: the learner's state is fresh
        results.append((meta_net, learner, optimizer))
    (meta_live, learner_live, opt_live), (meta_replay, learner_replay, opt_replay) = results
    assert_params_close(meta_live, dict(meta_replay.named_parameters()), atol=1e-12)
    assert_params_close(learner_live, dict(learner_replay.named_parameters()), atol=1e-12)
    for p, q in zip(learner_live.parameters(), learner_replay.parameters()):
        for key, value in opt_replay.state[q].items():
            assert torch.allclose(opt_live.state[p][key], value, atol=1e-12, rtol=0), key


def test_live_window_next_to_a_replayed_one():
    """meta differentiates through adapt (live, MAML) and through a second lower level (replay)."""
    tasks, results = make_tasks(2), []
    for live in (True, False):
        mlo.registry.clear()
        learner, meta_net = net(), net()
        anchor = nn.Parameter(torch.tensor([0.3, -0.2], dtype=D))

        @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=ALPHA),
                   data=[s for s, _ in tasks for _ in range(K)], unroll=K)
        def adapt(batch, module, meta: mlo.Init):
            return mse_of(module, batch)

        @mlo.level(module=anchor, optimizer=torch.optim.SGD([anchor], lr=0.4), unroll=K)
        def follow(module, meta):
            return 0.5 * ((module() - meta.params["2.bias"]) ** 2).sum()

        @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
                   data=[q for _, q in tasks], hypergrad="itd")
        def meta(batch, adapt, follow):
            return mse_of(adapt, batch) + 0.5 * (follow() ** 2).sum()

        program = mlo.Program(adapt, follow, meta)
        assert program._live == {"adapt": ("meta",), "follow": ("meta",)}
        del program._live["follow"]  # follow is replayed, adapt live (or replayed too)
        program._live_uppers.clear()
        if not live:
            program._live.clear()
        run(program, tasks)
        results.append(dict(meta_net.named_parameters()))
    for key, p in results[0].items():
        assert torch.allclose(p, results[1][key], atol=1e-12, rtol=0), key
    assert not torch.allclose(results[0]["2.bias"], net()[2].bias, atol=1e-6)


def test_two_upper_levels_share_a_live_trajectory_that_reads_both():
    """adapt's cost runs meta's network and takes a learned rate. Live, whichever upper level
    steps first, the other differentiates the same graph (it reads copies): both orders give
    the replay's result where the replay is exact (the rate first: a replay after meta's step
    would read meta's new parameters in adapt's cost)."""
    tasks, results = make_tasks(4), []
    for order, live in ((("meta", "inner_lr"), True), (("inner_lr", "meta"), True),
                        (("inner_lr", "meta"), False)):
        mlo.registry.clear()
        learner, meta_net = net(), net()
        rate = nn.Parameter(torch.tensor(ALPHA, dtype=D))

        @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=rate),
                   data=[s for s, _ in tasks for _ in range(K)], unroll=K)
        def adapt(batch, module, meta: mlo.Init, inner_lr):
            x, y = batch
            return mse_of(module, batch) + 0.1 * ((module(x) - meta(x)) ** 2).mean()

        queries = [q for _, q in tasks]
        levels = {"meta": mlo.level(module=meta_net, data=queries, hypergrad="itd", tasks=2,
                                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
                                    name="meta")(lambda batch, adapt: mse_of(adapt, batch)),
                  "inner_lr": mlo.level(module=rate, data=queries, hypergrad="itd",  # tasks=1
                                        optimizer=torch.optim.SGD([rate], lr=0.05),
                                        name="inner_lr")(lambda batch, adapt: mse_of(adapt, batch))}
        program = mlo.Program(adapt, *(levels[name] for name in order))
        assert program._live == {"adapt": order}
        if not live:
            program._live.clear()
            program._live_uppers.clear()
        run(program, tasks)
        results.append((dict(meta_net.named_parameters()), rate.detach().clone()))
    (phi, rate), others = results[0], results[1:]
    for other_phi, other_rate in others:
        for key, p in phi.items():
            assert torch.allclose(p, other_phi[key], atol=1e-12, rtol=0), key
        assert torch.allclose(rate, other_rate, atol=1e-12, rtol=0)
    assert not torch.allclose(rate, torch.tensor(ALPHA, dtype=D), atol=1e-6)


def _reweighting_program(live: bool, clip=None, method="itd", plain_sgd=False):
    """A bilevel program with dropout, BatchNorm, Adam (weight decay; plain SGD with
    `plain_sgd`), a scheduler and ITD over an unroll of 3: the lower level's real steps record the
    window (live) or it is replayed."""
    mlo.registry.clear()
    torch.manual_seed(0)
    x, y = torch.randn(24, 4, dtype=D), torch.randn(24, 1, dtype=D)
    net_ = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(6, 1)).to(D)
    scale = nn.Parameter(torch.zeros(4, dtype=D))
    optimizer = torch.optim.SGD(net_.parameters(), lr=0.05) if plain_sgd else \
        torch.optim.Adam(net_.parameters(), lr=0.05, weight_decay=0.01)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]

    @mlo.level(module=net_, optimizer=optimizer, data=train, unroll=3, clip_grad=clip,
               scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7))
    def fit(batch, module, weigh):
        inputs, targets = batch
        return ((module(inputs * weigh().exp()) - targets) ** 2).mean()

    @mlo.level(module=scale, optimizer=torch.optim.SGD([scale], lr=0.5), hypergrad=method,
               data=[(x[16:], y[16:])])
    def weigh(batch, fit):
        inputs, targets = batch
        return ((fit(inputs) - targets) ** 2).mean()

    program = mlo.Program(fit, weigh)
    if method == "itd":
        assert program._live == {"fit": ("weigh",)} and program._live_uppers == {"weigh"}
    if not live:
        program._live.clear()
        program._live_uppers.clear()
    return program, net_, scale, optimizer


@pytest.mark.parametrize("clip", [None, 0.05])
def test_plain_itd_recorded_by_the_real_steps_equals_the_replay(clip):
    """A lower level without mlo.Init: its real steps record the unroll; the hypergradient is the
    replay's (the replay draws the real steps' dropout masks), the module, its running statistics
    and its optimizer state those of the torch optimizer."""
    results = []
    for live in (True, False):
        program, net_, scale, optimizer = _reweighting_program(live, clip)
        torch.manual_seed(5)
        for _ in range(7):  # ends inside a window
            program.step()
        results.append((program, net_, scale, optimizer))
    (live, net_live, scale_live, opt_live), (_, net_replay, scale_replay, opt_replay) = results
    assert live.steps["weigh"] == 2 and not live._windows[("weigh", "fit")].live is None
    assert torch.allclose(scale_live, scale_replay, atol=1e-12, rtol=0)
    assert scale_live.detach().abs().max() > 1e-4  # a hypergradient that can differ
    for (key, a), b in zip(net_live.state_dict().items(), net_replay.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-12, rtol=0), key
    assert int(net_live[1].num_batches_tracked) == 7 + 2  # 7 steps, 2 upper forward passes
    for p, q in zip(net_live.parameters(), net_replay.parameters()):
        for key, value in opt_replay.state[q].items():
            assert torch.allclose(opt_live.state[p][key], value, atol=1e-12, rtol=0), key


def test_live_trajectory_holds_the_modules_values_exactly():
    """The graph is evaluated at the torch optimizer's values, bit for bit."""
    program, net_, _, _ = _reweighting_program(True)
    for _ in range(2):
        program.step()
    trajectory = program._windows[("weigh", "fit")].live
    for key, p in net_.named_parameters():
        assert torch.equal(trajectory.params[key], p) and trajectory.params[key].requires_grad


@pytest.mark.parametrize("plain_sgd", [False, True], ids=["adam", "plain-sgd"])
def test_resume_inside_a_live_window_continues_bit_for_bit(tmp_path, plain_sgd):
    """Adam: the window keeps the values each step had, and the replay at resume is moved onto
    them; plain SGD: the replay takes those very values, so the window keeps none."""
    def check(window):
        assert len(window.values) == 2 and all((v is None) == plain_sgd for v in window.values)

    assert_resumes_bit_for_bit(tmp_path, lambda: _reweighting_program(True, plain_sgd=plain_sgd),
                               check)


def assert_resumes_bit_for_bit(tmp_path, build, check=None):
    """A `_reweighting_program` saved one step into its second window (`check` sees that window
    first) and resumed by a fresh program takes the uninterrupted run's next 4 steps bit for
    bit."""
    program, net_, scale, _ = build()
    torch.manual_seed(3)
    for _ in range(5):  # one step into the second window
        program.step()
    if check is not None:
        check(program._windows[("weigh", "fit")])
    program.save(tmp_path / "mid.pt")
    for _ in range(4):
        program.step()
    expected = [p.detach().clone() for p in (*net_.parameters(), scale)]
    fresh, net_again, scale_again, _ = build()
    fresh.load_state_dict(mlo.checkpoint.load(tmp_path / "mid.pt"))
    for _ in range(4):
        fresh.step()
    for p, q in zip((*net_again.parameters(), scale_again), expected):
        assert torch.equal(p, q)


def test_plain_sgd_trajectory_equals_the_module_without_correction():
    """Plain SGD: the mirror's update is torch.optim.SGD's arithmetic, bit for bit."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        p = torch.randn(1000, dtype=dtype)
        g = torch.randn(1000, dtype=dtype)
        module = nn.Parameter(p.clone())
        module.grad = g.clone()
        optimizer = torch.optim.SGD([module], lr=0.1234567)
        optimizer.step()
        rule = mlo.optim.FunctionalOptimizer.from_optimizer(optimizer, {"w": module})
        stepped, _ = rule.step({"w": p}, {"w": g}, {})
        assert torch.equal(stepped["w"], module.detach())
    mlo.registry.clear()
    w, lam = nn.Parameter(torch.randn(7, dtype=D)), nn.Parameter(torch.zeros(7, dtype=D))

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.3), unroll=4)
    def inner(module, outer):
        return ((module() - outer().exp()) ** 4).sum()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad="itd")
    def outer(inner):
        return (inner() ** 2).sum()

    program = mlo.Program(inner, outer)
    for _ in range(3):
        program.step()
    assert torch.equal(program._windows[("outer", "inner")].live.params["param"], w)


@pytest.mark.parametrize("live", [True, False], ids=["live", "replayed"])
def test_a_parameter_the_cost_does_not_reach_is_not_updated(live):
    """As torch.optim skips a parameter without .grad (no weight decay, no momentum), so do the
    recorded and the replayed unrolls; both give the same hypergradient."""
    results = []
    for mode in (live, not live):
        mlo.registry.clear()
        torch.manual_seed(0)
        net_ = nn.ModuleDict({"used": nn.Linear(3, 1), "spare": nn.Linear(3, 1)}).to(D)
        spare = net_["spare"].weight.detach().clone()
        lam = nn.Parameter(torch.zeros(3, dtype=D))
        x, y = torch.randn(8, 3, dtype=D), torch.randn(8, 1, dtype=D)

        @mlo.level(module=net_, unroll=3, optimizer=torch.optim.SGD(net_.parameters(), lr=0.1,
                                                                    momentum=0.9, weight_decay=0.1))
        def inner(module, outer):
            return ((module.used(x * outer().exp()) - y) ** 2).mean()

        @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.5), hypergrad="itd")
        def outer(inner):
            return ((inner.used(x) - y) ** 2).mean()

        program = mlo.Program(inner, outer)
        if not mode:
            program._live.clear()
            program._live_uppers.clear()
        program.run(7, progress=False)
        assert torch.equal(net_["spare"].weight.detach(), spare)
        results.append(lam.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-12, rtol=0)
    assert results[0].abs().max() > 1e-5


@pytest.mark.parametrize("plain_sgd", [False, True], ids=["adam", "plain-sgd"])
def test_resume_after_a_skipped_step_inside_a_live_window(tmp_path, plain_sgd):
    """A step skipped for a non-finite loss keeps its place in the window's records, so a
    resumed window is rebuilt step by step as the real steps went."""
    def build():
        mlo.registry.clear()
        torch.manual_seed(0)
        w, lam = nn.Parameter(torch.randn(5, dtype=D)), nn.Parameter(torch.zeros(5, dtype=D))
        optimizer = torch.optim.SGD([w], lr=0.1) if plain_sgd else torch.optim.Adam([w], lr=0.1)
        poison = []

        @mlo.level(module=w, optimizer=optimizer, unroll=4)
        def inner(module, outer):
            loss = ((module() - outer().exp()) ** 2).sum()
            return loss * float("nan") if poison else loss

        @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad="itd")
        def outer(inner):
            return (inner() ** 2).sum()

        program = mlo.Program(inner, outer, on_nonfinite="skip")
        assert program._live == {"inner": ("outer",)}
        return program, poison, (w, lam)

    def steps(program, poison, start, stop):
        for step in range(start, stop):
            poison[:] = [True] if step == 5 else []  # the second step of the second window
            program.step()

    whole, poison, expected = build()
    steps(whole, poison, 0, 10)
    first, poison, _ = build()
    steps(first, poison, 0, 7)
    assert first.skipped["inner"] == 1
    first.save(tmp_path / "skip.pt")
    resumed, poison, params = build()
    resumed.load_state_dict(mlo.checkpoint.load(tmp_path / "skip.pt"))
    steps(resumed, poison, 7, 10)
    for p, q in zip(params, expected):
        assert torch.equal(p, q)


def test_a_skipped_step_is_not_replayed():
    """A replayed window (here: gradient accumulation) forgets a step skipped for a non-finite
    loss, so the hypergradient is that of the steps actually taken: the same as a program whose
    data never had that step."""
    def build(batches, unroll, poison_at=None):
        mlo.registry.clear()
        torch.manual_seed(0)
        w, lam = nn.Parameter(torch.randn(5, dtype=D)), nn.Parameter(torch.zeros(5, dtype=D))
        calls = []

        @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), data=batches,
                   unroll=unroll, grad_accum=2)
        def inner(batch, module, outer):
            calls.append(1)
            loss = ((module() * batch - outer().exp()) ** 2).sum()
            return loss * float("nan") if len(calls) == poison_at else loss

        @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad="itd")
        def outer(inner):
            return (inner() ** 2).sum()

        program = mlo.Program(inner, outer, on_nonfinite="skip")
        assert not program._live  # replayed: gradient accumulation
        return program, lam

    torch.manual_seed(1)
    data = [torch.rand(5, dtype=D) + 0.5 for _ in range(6)]
    poisoned, lam = build(data, unroll=3, poison_at=3)  # the second step's first micro-batch
    for _ in range(3):
        poisoned.step()
    assert poisoned.skipped["inner"] == 1 and poisoned.steps["outer"] == 1
    clean, lam_clean = build(data[:2] + data[4:], unroll=2)
    for _ in range(2):
        clean.step()
    assert clean.steps["outer"] == 1
    assert torch.allclose(lam, lam_clean, atol=1e-14, rtol=0) and lam.abs().max() > 1e-6
