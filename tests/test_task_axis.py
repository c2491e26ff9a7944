"""mlo.task_axis: `tasks=T, vmap=True` runs a meta-batch's tasks side by side and computes what the
sequential meta-batch (`tasks=T`) and hand-written MAML compute; checkpoints resume exactly; every
program it cannot run is refused with an error naming the level and the fix."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlo
from mlo.errors import GraphError, LevelError

sys.path.insert(0, str(Path(__file__).parent))
from meta_tasks import (ALPHA, BETA, D, K, assert_params_close, make_tasks, mse_of,  # noqa: E402
                        net)
from test_meta import maml_by_hand  # noqa: E402

T = 3


def stack(batches):
    return tuple(torch.stack(parts) for parts in zip(*batches))


def task_batches(tasks):
    """The support batches (K steps per meta-batch) and query batches, T tasks stacked."""
    groups = [tasks[j:j + T] for j in range(0, len(tasks), T)]
    support = [stack([s for s, _ in group]) for group in groups for _ in range(K)]
    return support, [stack([q for _, q in group]) for group in groups]


def program(tasks, vmap=True, hypergrad="itd", inner=None, model=net, metrics=False,
            dropout=False):
    learner, meta_net = model(), model()
    if dropout:
        learner, meta_net = (nn.Sequential(m, nn.Dropout(0.3)) for m in (learner, meta_net))
    if vmap:
        support, query = task_batches(tasks)
    else:
        support, query = [s for s, _ in tasks for _ in range(K)], [q for _, q in tasks]
    inner = inner or (lambda ps: torch.optim.SGD(ps, lr=ALPHA))

    @mlo.level(module=learner, optimizer=inner(learner.parameters()), data=support, unroll=K)
    def adapt(batch, module, meta: mlo.Init):
        loss = mse_of(module, batch)
        return {"loss": loss, "half": 0.5 * loss} if metrics else loss

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=BETA),
               data=query, hypergrad=hypergrad, tasks=T, vmap=vmap)
    def meta(batch, adapt):
        return mse_of(adapt, batch)

    return mlo.Program(adapt, meta), meta_net, (adapt, meta)


def steps(program_, tasks, vmap=True):
    for _ in range(len(tasks) * K // (T if vmap else 1)):
        program_.step()


def assert_same(a: nn.Module, b: nn.Module, atol=1e-12):
    for (key, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol, rtol=0), key


@pytest.mark.parametrize("hypergrad", ["itd", mlo.hypergrad.itd(first_order=True)])
def test_side_by_side_equals_one_after_another_and_by_hand(hypergrad):
    tasks = make_tasks(6)
    together, meta_net, _ = program(tasks, hypergrad=hypergrad)
    steps(together, tasks)
    assert together.steps == {"adapt": 2 * K, "meta": 2}  # a meta step: K global steps
    sequential, reference, _ = program(tasks, vmap=False, hypergrad=hypergrad)
    steps(sequential, tasks, vmap=False)
    assert_same(meta_net, reference)
    if hypergrad == "itd":
        assert_params_close(meta_net, maml_by_hand(net(), tasks, T))
    else:
        assert_params_close(meta_net, maml_by_hand(net(), tasks, T, first_order=True))


def test_an_adam_learner_keeps_its_moments_per_task():
    tasks = make_tasks(6)
    adam = lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9))  # noqa: E731
    together, meta_net, (adapt, _) = program(tasks, inner=adam)
    steps(together, tasks)
    sequential, reference, _ = program(tasks, vmap=False, inner=adam)
    steps(sequential, tasks, vmap=False)
    assert_same(meta_net, reference)
    assert not adapt.optimizer.state  # the mirror is the update: the torch optimizer is unused


def test_losses_and_metrics_are_the_tasks_mean():
    tasks = make_tasks(3)
    together, _, _ = program(tasks, metrics=True)
    together.step()
    support, _ = task_batches(tasks)
    phi = net()
    with torch.no_grad():
        expected = sum(mse_of(phi, (x, y)) for x, y in zip(*support[0])) / T
    entry = together.history["adapt"][-1]  # losses are logged in float32
    assert entry["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert entry["half"] == pytest.approx(0.5 * float(expected), rel=1e-6)


def test_resume_inside_a_window_is_exact(tmp_path):
    tasks = make_tasks(6)
    torch.manual_seed(5)
    whole, whole_net, _ = program(tasks, dropout=True)
    steps(whole, tasks)
    torch.manual_seed(5)
    first, _, _ = program(tasks, dropout=True)
    for _ in range(K + 1):  # inside the second meta-batch's window
        first.step()
    first.save(tmp_path / "mid.pt")
    resumed, resumed_net, levels = program(tasks, dropout=True)
    resumed.load_state_dict(torch.load(tmp_path / "mid.pt", weights_only=True))
    for _ in range(K - 1):
        resumed.step()
    for p, q in zip(whole_net.parameters(), resumed_net.parameters()):
        assert torch.equal(p, q)


def test_misuse_is_refused_with_the_fix():
    tasks = make_tasks(3)
    support, query = task_batches(tasks)
    learner, meta_net = net(), net()
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(LevelError, match="tasks=1"):
        mlo.level(module=meta_net, optimizer=opt(meta_net), vmap=True, name="meta")(
            lambda adapt: 0)

    def build(meta_method="itd", init=True, learner_module=learner, clip=None, reader=False,
              data=support):
        if init:
            def adapt(batch, module, meta: mlo.Init):
                return mse_of(module, batch)
        else:  # reads meta's parameters, without starting from them
            def adapt(batch, module, meta):
                return mse_of(module, batch) + 1e-3 * sum((p ** 2).sum()
                                                          for p in meta.params.values())
        adapt = mlo.level(module=learner_module, optimizer=opt(learner_module), data=data,
                          unroll=K, clip_grad=clip)(adapt)

        @mlo.level(module=meta_net, optimizer=opt(meta_net), data=query, hypergrad=meta_method,
                   tasks=T, vmap=True)
        def meta(batch, adapt):
            return mse_of(adapt, batch)

        levels = [adapt, meta]
        if reader:
            watcher = nn.Linear(1, 1).to(D)

            @mlo.level(module=watcher, optimizer=opt(watcher), data=query)
            def watch(batch, module, adapt):
                return mse_of(adapt, batch) + module.weight.sum()
            levels.append(watch)
        return mlo.Program(*levels)

    with pytest.raises(GraphError, match="vmap=True, which needs hypergrad='itd'"):
        build(meta_method="aid_cg")
    with pytest.raises(GraphError, match="does not start from it"):
        build(init=False)
    counted = net()
    counted.register_buffer("seen", torch.zeros(1, dtype=D))  # e.g. BatchNorm's statistics
    with pytest.raises(GraphError, match="buffers \\('seen'\\)"):
        build(learner_module=counted)
    with pytest.raises(GraphError, match="clip_grad"):
        build(clip=1.0)
    with pytest.raises(GraphError, match="'watch' reads too"):
        build(reader=True)
    with pytest.raises(LevelError, match="leading axis of size 3"):
        build(data=[s for s, _ in tasks]).step()  # one task's batch, not T stacked
