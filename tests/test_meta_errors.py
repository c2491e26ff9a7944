"""Every error of meta-learning programs (mlo/meta.py), pinned by its message."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlo

sys.path.insert(0, str(Path(__file__).parent))
from meta_tasks import D, net  # noqa: E402


def pair(learner, meta_module, warmup=0, meta_names_adapt=True, tasks=1):
    @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=0.1),
               warmup=warmup)
    def adapt(module, meta: "mlo.Init"):
        return module[0].weight.sum() if isinstance(module.level.module, nn.Sequential) else 0

    if meta_names_adapt:
        @mlo.level(module=meta_module, optimizer=torch.optim.SGD(meta_module.parameters(), lr=0.1),
                   hypergrad="itd", tasks=tasks)
        def meta(adapt):
            return adapt.params["0.weight"].sum()
    else:
        @mlo.level(module=meta_module, optimizer=torch.optim.SGD(meta_module.parameters(), lr=0.1))
        def meta(module):
            return module.params["0.weight"].sum()
    return adapt, meta


def test_init_annotation_is_parsed_from_the_signature():
    adapt, _ = pair(net(), net())
    assert adapt.names == (("meta", "init"),)


def test_init_with_a_different_shape_names_the_parameter():
    wide = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)
    with pytest.raises(mlo.GraphError, match=r"Program: level 'adapt' starts from 'meta' "
                       r"\(mlo\.Init\), but their parameters differ: parameter '0\.weight' has "
                       r"shape \(5, 1\) in 'adapt' and \(6, 1\) in 'meta'(?s:.*)copy\.deepcopy"):
        mlo.Program(*pair(net(), wide))


def test_init_with_other_parameter_names_names_the_first_missing_one():
    longer = nn.Sequential(*net(), nn.Linear(1, 1).to(D))
    with pytest.raises(mlo.GraphError, match=r"parameters differ: 'meta' has parameter "
                                             r"'3\.weight', 'adapt' has none of that name"):
        mlo.Program(*pair(net(), longer))
    mlo.registry.clear()
    with pytest.raises(mlo.GraphError, match=r"parameters differ: 'adapt' has parameter "
                                             r"'3\.weight', 'meta' has none of that name"):
        mlo.Program(*pair(longer, net()))


def test_init_level_must_read_the_lower_solution():
    with pytest.raises(mlo.GraphError, match=r"'meta' does not read 'adapt''s solution, so 'adapt' "
                                             r"has no unroll window to start"):
        mlo.Program(*pair(net(), net(), meta_names_adapt=False))


def test_warmup_on_a_level_that_starts_from_another_is_refused():
    with pytest.raises(mlo.GraphError, match=r"level 'adapt' starts each unroll window from 'meta' "
                                             r"\(mlo\.Init\), so it cannot take warmup=2 steps"):
        mlo.Program(*pair(net(), net(), warmup=2))


def test_tasks_must_be_a_positive_integer():
    with pytest.raises(mlo.LevelError, match=r"@level 'meta': tasks must be an integer >= 1, "
                                             r"got 0"):
        pair(net(), net(), tasks=0)


def test_tasks_on_a_level_that_reads_no_solution():
    w = nn.Parameter(torch.zeros(2, dtype=D))

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1), tasks=3)
    def alone(module):
        return (module() ** 2).sum()

    with pytest.raises(mlo.GraphError, match=r"level 'alone' has tasks=3, but it reads no level's "
                                             r"solution(?s:.*)grad_accum=3"):
        mlo.Program(alone)


def test_itd_above_a_meta_batched_level_is_refused():
    learner, meta_net, lam = net(), net(), nn.Parameter(torch.zeros((), dtype=D))

    @mlo.level(module=learner, optimizer=torch.optim.SGD(learner.parameters(), lr=0.1))
    def adapt(module, meta: mlo.Init):
        return module.params["0.weight"].sum()

    @mlo.level(module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.1),
               hypergrad="itd", tasks=2)
    def meta(adapt, top: mlo.Upper):
        return adapt.params["0.weight"].sum() * top()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad="itd")
    def top(meta):
        return meta.params["0.weight"].sum()

    with pytest.raises(mlo.GraphError, match=r"level 'top' \(itd\) replays the steps of 'meta', "
                                             r"which has tasks=2"):
        mlo.Program(adapt, meta, top)


def learned_rate_program(rate_hypergrad="itd", named=True):
    learner, rate = net(), nn.Parameter(torch.tensor(0.1, dtype=D))
    optimizer = torch.optim.SGD(learner.parameters(), lr=rate)
    if named:
        @mlo.level(module=learner, optimizer=optimizer)
        def adapt(module, inner_lr):
            return module.params["0.weight"].sum()
    else:
        @mlo.level(module=learner, optimizer=optimizer)
        def adapt(module):
            return module.params["0.weight"].sum()

    @mlo.level(module=rate, optimizer=torch.optim.SGD([rate], lr=0.1), hypergrad=rate_hypergrad)
    def inner_lr(adapt):
        return adapt.params["0.weight"].sum()

    return mlo.Program(adapt, inner_lr)


def test_learned_rate_of_a_level_not_named_is_refused():
    with pytest.raises(mlo.GraphError, match=r"level 'adapt''s optimizer has lr= parameter 'param' "
                                             r"of level 'inner_lr', but 'inner_lr' is not an upper "
                                             r"level named by 'adapt'"):
        learned_rate_program(named=False)


def test_learned_rate_needs_itd():
    with pytest.raises(mlo.GraphError, match=r"level 'inner_lr', which declares "
                                             r"hypergrad=aid_cg\(.*only itd differentiates"):
        learned_rate_program(rate_hypergrad="aid_cg")


def test_learned_rate_is_recorded_by_value():
    rate = nn.Parameter(torch.tensor(0.1, dtype=D))
    learner = net()
    optimizer = torch.optim.SGD(learner.parameters(), lr=rate)
    rule = mlo.optim.FunctionalOptimizer.from_optimizer(optimizer, dict(learner.named_parameters()))
    with torch.no_grad():
        rate.fill_(5.0)  # the owner steps later: the record keeps the value the step used
    assert float(rule.hyper["0.weight"]["lr"]) == pytest.approx(0.1)
