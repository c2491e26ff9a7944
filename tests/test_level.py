import inspect
import re

import pytest
import torch
from torch import nn

import mlo


def test_every_keyword_is_accepted_and_kept():
    net = nn.Linear(2, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    data = [torch.ones(1, 2)] * 2  # grad_accum=2 needs 2 batches per epoch
    method = mlo.hypergrad.aid_cg(iters=20, damping=1e-3)

    @mlo.level(module=net, optimizer=optimizer, data=data, hypergrad=method, unroll=3,
               fp16=False, bf16=True, scheduler=scheduler, grad_accum=2, clip_grad=1.0,
               warmup=5, name="outer")
    def cost(batch, module, inner):
        return module(batch).sum()

    assert isinstance(cost, mlo.Level) and cost.name == "outer"
    assert cost.module is net and cost.optimizer is optimizer and cost.data is data
    assert cost.method is method
    options = cost.options
    assert (options.unroll, options.grad_accum, options.clip_grad, options.warmup) == (3, 2, 1.0, 5)
    assert (options.fp16, options.bf16, options.scheduler) == (False, True, scheduler)
    assert cost.names == (("inner", None),) and cost.uses_batch and cost.uses_module


def test_hypergrad_strings_resolve_to_methods(parts):
    for name in ("itd", "aid_cg", "aid_neumann", "aid_fd", "sama", "first_order"):
        @mlo.level(**parts(name))
        def outer(batch):
            return batch

        assert isinstance(outer.method, mlo.hypergrad.Method) and outer.method.name == name
    assert mlo.level(**parts())(lambda_free).method is None


def lambda_free(batch):
    return batch


BAD = [
    (dict(module="net"), r"@level 'cost': module must be an nn\.Module or a tensor of "
                         r"hyperparameters, got str\."),
    (dict(module=torch.zeros(2)), r"@level 'cost': the module tensor does not require grad"),
    (dict(optimizer=None), r"@level 'cost': optimizer must be a torch\.optim\.Optimizer over the "
                           r"module's parameters, got NoneType\."),
    (dict(data=3), r"@level 'cost': data must be an iterable of batches .* got int\."),
    (dict(unroll=0), r"@level 'cost': unroll must be an integer >= 1, got 0\."),
    (dict(unroll=1.5), r"@level 'cost': unroll must be an integer >= 1, got 1\.5\."),
    (dict(unroll=True), r"@level 'cost': unroll must be an integer >= 1, got True\."),
    (dict(grad_accum=0), r"@level 'cost': grad_accum must be an integer >= 1, got 0\."),
    (dict(warmup=-1), r"@level 'cost': warmup must be an integer >= 0, got -1\."),
    (dict(clip_grad=0), r"@level 'cost': clip_grad must be a positive max norm or None, got 0\."),
    (dict(clip_grad="1"), r"clip_grad must be a positive max norm or None, got '1'\."),
    (dict(clip_grad=True), r"clip_grad must be a positive max norm or None, got True\."),
    (dict(fp16="yes"), r"@level 'cost': fp16 must be True or False, got 'yes'\."),
    (dict(bf16=1), r"@level 'cost': bf16 must be True or False, got 1\."),
    (dict(fp16=True, bf16=True), r"@level 'cost': fp16 and bf16 are both set; choose one"),
    (dict(scheduler=object()), r"@level 'cost': scheduler must be a torch\.optim\.lr_scheduler"),
    (dict(name="not valid"), r"@level: name must be a Python identifier, got 'not valid'\."),
    (dict(hypergrad=3), r"@level 'cost': hypergrad must be a method name \(itd, aid_cg, "
                        r"aid_neumann, aid_fd, sama, first_order\).* got int\."),
]


@pytest.mark.parametrize("keywords, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_keyword_is_a_level_error_at_decoration(parts, keywords, message):
    declaration = mlo.level(**{**parts(), **keywords})
    with pytest.raises(mlo.LevelError, match=message):
        @declaration
        def cost(batch, module):
            return module(batch).sum()
    assert "cost" not in mlo.registry


def test_unknown_hypergrad_string_lists_the_valid_ones(parts):
    with pytest.raises(mlo.LevelError, match=r"@level 'outer': unknown hypergrad 'aid_fdd'; valid: "
                       r"itd, aid_cg, aid_neumann, aid_fd, sama, first_order\. "
                       r"Did you mean 'aid_fd'\?"):
        @mlo.level(**parts("aid_fdd"))
        def outer(batch, inner):
            return inner(batch).sum()


def test_scheduler_of_another_optimizer(parts):
    other = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(mlo.LevelError, match=r"@level 'lambda_free': the scheduler drives "
                       r"another optimizer; build it on this level's optimizer\."):
        mlo.level(**parts(scheduler=scheduler))(lambda_free)


def test_decorating_a_level_twice(parts):
    once = mlo.level(**parts())(lambda_free)
    with pytest.raises(mlo.LevelError, match=r"got <mlo level 'lambda_free'>; apply "
                       r"@mlo.level\(...\) once"):
        mlo.level(**parts())(once)


# -- signature rules ------------------------------------------------------------------------------

def test_args_and_kwargs_are_rejected_with_the_location(parts):
    line = inspect.currentframe().f_lineno + 4
    with pytest.raises(mlo.LevelError, match=r"@level 'cost': \*args / \*\*kwargs are not allowed"
                       rf".*\n  {re.escape(__file__)}:{line}:  def cost\(batch, \*levels\)"):
        @mlo.level(**parts())
        def cost(batch, *levels):
            return batch

    with pytest.raises(mlo.LevelError, match=r"@level 'cost': \*args / \*\*kwargs"):
        @mlo.level(**parts())
        def cost(batch, **levels):  # noqa: F811
            return batch


def test_positional_only_is_rejected(parts):
    with pytest.raises(mlo.LevelError, match=r"parameter 'batch' is positional-only"):
        @mlo.level(**parts())
        def cost(batch, /, module):
            return batch


def test_reserved_names_and_defaults_are_never_injected(parts):
    @mlo.level(**parts())
    def cost(module, inner, *, outer, scale=2.0, classifier=None, batch=None):
        return module

    assert cost.names == (("inner", None), ("outer", None))
    assert cost.uses_module and not cost.uses_batch


def test_upper_and_lower_annotations_including_strings(parts):
    @mlo.level(**parts("itd"))
    def mid(batch, module, top: mlo.Upper, low: "mlo.Lower", other):
        return batch

    assert mid.names == (("top", "upper"), ("low", "lower"), ("other", None))


def test_other_annotation_is_rejected(parts):
    with pytest.raises(mlo.LevelError, match=r"@level 'cost': parameter 'inner' has annotation "
                       r".*only mlo\.Upper or mlo\.Lower"):
        @mlo.level(**parts())
        def cost(batch, inner: nn.Module):
            return batch


# -- optimizer coverage -----------------------------------------------------------------------------

def test_optimizer_missing_a_trainable_parameter():
    net = nn.Linear(2, 1)
    with pytest.raises(mlo.OptimizerError, match=r"@level 'cost': the optimizer does not cover the "
                       r"module's trainable parameters 'bias'; build it from module\.parameters"):
        mlo.level(module=net, optimizer=torch.optim.SGD([net.weight], lr=0.1), name="cost")(
            lambda_free)


def test_optimizer_holding_another_modules_parameters():
    net, other = nn.Linear(2, 1), nn.Linear(2, 1)
    optimizer = torch.optim.SGD([*net.parameters(), other.weight], lr=0.1)
    with pytest.raises(mlo.OptimizerError, match=r"@level 'cost': the optimizer holds 1 "
                       r"parameter\(s\) that are not trainable parameters of this level's module"):
        mlo.level(module=net, optimizer=optimizer, name="cost")(lambda_free)


def test_frozen_parameters_need_not_be_in_the_optimizer():
    net = nn.Linear(2, 1)
    net.bias.requires_grad_(False)
    cost = mlo.level(module=net, optimizer=torch.optim.SGD([net.weight], lr=0.1))(lambda_free)
    assert set(cost.named_parameters()) == {"weight"}


# -- a level outside a program ------------------------------------------------------------------------

def test_calling_a_level_runs_its_module_with_current_parameters(parts):
    keywords = parts()
    net = keywords["module"]

    @mlo.level(**keywords)
    def classifier(batch, module):
        return module(batch).sum()

    x = torch.randn(4, 2)
    torch.testing.assert_close(classifier(x), x @ net.weight.T + net.bias)
    with torch.no_grad():
        net.weight.add_(1.0)
    torch.testing.assert_close(classifier(x), x @ net.weight.T + net.bias)


def test_calling_a_tensor_level_returns_the_tensor():
    lam = nn.Parameter(torch.tensor([0.5, 2.0]))
    hyper = mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))(lambda_free)
    assert hyper() is lam and set(hyper.named_parameters()) == {"param"}


# -- registry -----------------------------------------------------------------------------------------

def test_registry_records_levels_by_name(parts):
    first = mlo.level(**parts())(lambda_free)
    renamed = mlo.level(**parts(), name="other")(lambda_free)
    assert mlo.registry["lambda_free"] is first and mlo.registry["other"] is renamed
    assert mlo.registry.levels() == [first, renamed] and len(mlo.registry) == 2


def test_redefining_a_level_replaces_it(parts):
    old = mlo.level(**parts())(lambda_free)
    other = mlo.level(**parts(), name="other")(lambda_free)
    new = mlo.level(**parts())(lambda_free)
    assert mlo.registry.levels() == [other, new]
    assert all(level is not old for level in mlo.registry.levels())
    program = mlo.Program()
    assert program.levels == {"other": other, "lambda_free": new}


def test_program_of_explicit_levels_ignores_the_registry(parts):
    a = mlo.level(**parts(), name="a")(lambda_free)
    mlo.level(**parts(), name="b")(lambda_free)
    assert list(mlo.Program(a).levels) == ["a"]
    assert list(mlo.Program().levels) == ["a", "b"]


def test_registry_lookup_suggests_the_closest_name(parts):
    mlo.level(**parts(), name="classifier")(lambda_free)
    with pytest.raises(KeyError, match=r"no level named 'clasifier'; levels: 'classifier'\. "
                       r"Did you mean 'classifier'\?"):
        mlo.registry["clasifier"]


def test_empty_program():
    with pytest.raises(mlo.GraphError, match=r"Program: no levels; pass them"):
        mlo.Program()


def test_tensor_data_is_refused_with_how_to_wrap_it(parts):
    with pytest.raises(mlo.LevelError, match=r"@level 'lambda_free': data is a tensor of shape "
                       r"\(8, 2\), whose batches would be its single rows; pass an iterable of "
                       r"batches: a list such as \[\(x, y\)\], or DataLoader\(TensorDataset\(x, y\)"):
        mlo.level(**parts(data=torch.zeros(8, 2)))(lambda_free)


def test_map_style_dataset_data_is_refused_with_how_to_batch_it(parts):
    dataset = torch.utils.data.TensorDataset(torch.zeros(8, 2))
    with pytest.raises(mlo.LevelError, match=r"@level 'lambda_free': data is a TensorDataset, whose "
                       r"items are single examples, not batches; pass DataLoader\(dataset, "
                       r"batch_size=\.\.\.\)\."):
        mlo.level(**parts(data=dataset))(lambda_free)


def test_calling_a_trained_level_under_no_grad_keeps_no_graph(parts):
    keywords = parts()

    @mlo.level(**keywords)
    def classifier(batch, module):
        return module(batch).pow(2).mean()

    lam = nn.Parameter(torch.tensor([0.5, 2.0]))
    hyper = mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1))(lambda_free)
    program = mlo.Program(classifier)
    program.step(classifier=torch.randn(4, 2))
    x = torch.randn(4, 2)
    assert classifier(x).requires_grad  # like calling the module: a graph outside no_grad
    with torch.no_grad():
        out, value = classifier(x), hyper()
    assert not out.requires_grad and out.grad_fn is None
    assert not value.requires_grad and torch.equal(value, lam.detach())
    torch.testing.assert_close(out, keywords["module"](x))


def test_level_compiled_under_another_files_name_still_declares(parts, tmp_path):
    """Code compiled with a file name that is not its source: no traceback from locating it."""
    unrelated = tmp_path / "notes.py"
    unrelated.write_text('x = """never closed\n')
    namespace = {"mlo": mlo, "options": parts()}
    code = "@mlo.level(**options)\ndef inner(module):\n    return module(torch.ones(2)).sum()\n"
    exec(compile(code, str(unrelated), "exec"), {**namespace, "torch": torch})
    assert mlo.registry["inner"].location.startswith("<unknown>:  def inner(module)")
