"""Bad input: each case gets a typed error whose message says where, what and how to fix it."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo


def bilevel(inner_size=3, inner_data=None, outer_data=None, optimizer=torch.optim.SGD,
            dtype=torch.float32, **inner_options):
    """A ridge-like bilevel program: inner fits a linear model, outer learns its decay."""
    torch.manual_seed(0)
    net = nn.Linear(inner_size, 1).to(dtype)
    decay = nn.Parameter(torch.zeros(1))
    x = torch.randn(4, inner_size)
    default = [(x, x.sum(1, keepdim=True))] * 2

    @mlo.level(module=net, optimizer=optimizer(net.parameters(), lr=0.1),
               data=default if inner_data is None else inner_data, **inner_options)
    def inner(batch, module, outer):
        inputs, targets = batch
        return ((module(inputs) - targets) ** 2).mean() + outer().exp()[0] * 1e-3

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.1),
               data=default if outer_data is None else outer_data, hypergrad="aid_fd")
    def outer(batch, inner):
        inputs, targets = batch
        return ((inner(inputs) - targets) ** 2).mean()

    return inner, outer


def one_level(name, module=None, optimizer=None):
    """A level without data, `name`, whose cost sums its module's output on ones(3)."""
    module = nn.Linear(3, 1) if module is None else module
    optimizer = optimizer or torch.optim.SGD(module.parameters(), lr=0.1)
    return mlo.level(module=module, optimizer=optimizer, name=name)(
        lambda module: module(torch.ones(3)).sum())


def program(**options):
    return mlo.Program(*bilevel(**options))


def saved(tmp_path, **options):
    path = tmp_path / "ckpt.pt"
    source = program(**options)
    source.step()
    source.save(path)
    mlo.registry.clear()
    return path


# -- checkpoints of another program ----------------------------------------------------------------

def test_checkpoint_with_other_shapes(tmp_path):
    path = saved(tmp_path, inner_size=3)
    with pytest.raises(mlo.CheckpointError, match=r"load_state_dict: level 'inner': 'weight' has "
                                                  r"shape \(1, 3\) in the checkpoint and \(1, 5\) "
                                                  r"here; build the module with the sizes"):
        mlo.Program.load(path, *bilevel(inner_size=5))


def test_checkpoint_with_other_architecture(tmp_path):
    path = saved(tmp_path)
    inner, outer = bilevel()
    inner.module.extra = nn.Linear(1, 1)
    with pytest.raises(mlo.CheckpointError, match=r"level 'inner': the checkpoint's module has "
                                                  r"entries \(none\) that this one lacks, and "
                                                  r"lacks 'extra.bias', 'extra.weight'"):
        mlo.Program(inner, outer).load_state_dict(torch.load(path, weights_only=True))


def test_checkpoint_with_other_optimizer(tmp_path):
    path = saved(tmp_path, optimizer=torch.optim.SGD)
    with pytest.raises(mlo.CheckpointError, match=r"level 'inner': the checkpoint's optimizer has "
                                                  r"other parameter groups or hyperparameters "
                                                  r"\(\[.*'momentum'.*\]\) than this level's"):
        mlo.Program.load(path, *bilevel(optimizer=torch.optim.Adam))


def test_checkpoint_with_a_level_missing_at_load(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(mlo.CheckpointError, match=r"checkpoint has levels 'inner', 'outer', this "
                                                  r"program has 'single' \(missing here: 'inner', "
                                                  r"'outer'; not in the checkpoint: 'single'\)"):
        mlo.Program.load(path, one_level("single"))


def test_checkpoint_of_a_level_subset(tmp_path):
    path = saved(tmp_path)
    inner, _ = bilevel()
    net = nn.Linear(3, 1)

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
               data=[(torch.ones(1, 3), torch.ones(1, 1))])
    def inner(batch, module):  # noqa: F811 -- the same name, now a one-level program
        return module(batch[0]).sum()

    with pytest.raises(mlo.CheckpointError, match=r"missing here: 'outer'; not in the "
                                                  r"checkpoint: \(none\)"):
        mlo.Program.load(path, inner)


# -- data -----------------------------------------------------------------------------------------

def test_empty_data_list():
    with pytest.raises(mlo.LevelError, match=r"@level 'inner': data is empty \(length 0\), so "
                                             r"this level has no batch"):
        bilevel(inner_data=[])


def test_empty_dataset_loader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1)), batch_size=2)
    with pytest.raises(mlo.LevelError, match=r"@level 'inner': data is empty"):
        bilevel(inner_data=empty)


def test_one_shot_iterator_exhausted():
    x = torch.ones(2, 3)
    batches = iter([(x, x.sum(1, keepdim=True))])
    p = program(inner_data=batches)
    p.step()
    with pytest.raises(mlo.MloError, match=r"Program.step \(step 1\): level 'inner': its data "
                                           r"yielded no batch after a restart"):
        p.step()


class Flaky(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == 5:
            raise OSError("image 5 is unreadable")
        return torch.full((3,), float(index)), torch.ones(1)


def test_data_loader_that_raises_mid_epoch():
    p = program(inner_data=DataLoader(Flaky(), batch_size=2))
    p.step()
    p.step()
    with pytest.raises(mlo.MloError, match=r"Program.step \(step 2\): level 'inner': its data "
                                           r"raised OSError drawing batch 2 of epoch 0 \(image 5 "
                                           r"is unreadable\); the original error is chained"
                       ) as caught:
        p.step()
    assert isinstance(caught.value.__cause__, OSError)


def test_grad_accum_larger_than_the_data():
    with pytest.raises(mlo.LevelError, match=r"@level 'inner': grad_accum=3 exceeds the 2 "
                                             r"batches of data per epoch.*at most 2"):
        bilevel(grad_accum=3)


def test_data_that_is_not_iterable():
    with pytest.raises(mlo.LevelError, match=r"@level 'inner': data must be an iterable of "
                                             r"batches .* got int"):
        bilevel(inner_data=5)


def test_level_that_takes_a_batch_without_data(parts):
    @mlo.level(**parts())
    def alone(batch, module):
        return module(batch).sum()

    with pytest.raises(mlo.MloError, match=r"Program.step \(step 0\): level 'alone' takes a "
                                           r"batch but has no data"):
        mlo.Program(alone).step()


# -- devices and dtypes ---------------------------------------------------------------------------

def test_data_on_another_device_than_the_module():
    x = torch.ones(2, 3, device="meta")
    p = program(inner_data=[(x, x.sum(1, keepdim=True))] * 2)
    with pytest.raises(mlo.LevelError, match=r"Program.step \(step 0\): level 'inner': its batch "
                                             r"is on meta, but its module's parameters are on "
                                             r"cpu; put both on one device") as caught:
        p.step()
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_module_on_the_meta_device():
    with pytest.raises(mlo.LevelError, match=r"@level 'meta_net': the module's parameters are on "
                                             r"the meta device .* module.to_empty"):
        one_level("meta_net", nn.Linear(3, 1, device="meta"))


def test_float64_parameters_with_float32_data():
    with pytest.raises(mlo.LevelError, match=r"level 'inner': its batch is float32, but its "
                                             r"module's parameters are float64; use one dtype: "
                                             r"convert the batch to float64"):
        program(dtype=torch.float64).step()


def test_other_errors_of_a_step_are_not_explained_as_dtype_clashes():
    net = nn.Linear(3, 1).double()
    x = torch.ones(4, 5)  # float32 data that the cost converts; its width is the error

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=[x])
    def converts(batch, module):
        return module(batch.double()).mean()

    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied") as caught:
        mlo.Program(converts).step()
    assert not isinstance(caught.value, mlo.MloError)


def test_upper_level_data_of_another_dtype_than_the_lower_level():
    x = torch.ones(4, 3, dtype=torch.float64)
    inner, outer = bilevel(outer_data=[(x.float(), x.sum(1, keepdim=True))] * 2,
                           dtype=torch.float64,
                           inner_data=[(x, x.sum(1, keepdim=True))] * 2)
    p = mlo.Program(inner, outer)
    with pytest.raises(mlo.LevelError, match=r"level 'outer': its batch is float32, but the "
                                             r"parameters of level 'inner' are float64"):
        p.step()


# -- parameters and optimizers --------------------------------------------------------------------

def test_module_with_no_trainable_parameters():
    with pytest.raises(mlo.LevelError, match=r"@level 'frozen': the module has no trainable "
                                             r"parameters \(none, or all frozen\)"):
        one_level("frozen", nn.Linear(3, 1).requires_grad_(False))


def test_two_levels_sharing_one_module():
    net = nn.Linear(3, 1)
    first, second = one_level("first", net), one_level("second", net)
    with pytest.raises(mlo.GraphError, match=r"Program: levels 'first' and 'second' share a "
                                             r"parameter \('weight' of 'first' is 'weight' of "
                                             r"'second'\).*copy.deepcopy"):
        mlo.Program(first, second)


def test_two_levels_sharing_one_parameter():
    net = nn.Linear(3, 1)
    model = one_level("model", net)

    @mlo.level(module=net.bias, optimizer=torch.optim.SGD([net.bias], lr=0.1))
    def offset(model):
        return model(torch.ones(3)).sum()

    with pytest.raises(mlo.GraphError, match=r"levels 'model' and 'offset' share a parameter "
                                             r"\('bias' of 'model' is 'param' of 'offset'\)"):
        mlo.Program(model, offset)


def test_negative_learning_rate():
    net = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = -0.1  # torch checks lr only at construction
    with pytest.raises(mlo.LevelError, match=r"@level 'climb': the optimizer's param group 0 has "
                                             r"lr=-0.1; a negative learning rate climbs the cost"):
        one_level("climb", net, optimizer)


@pytest.mark.parametrize("options, message", [
    (dict(unroll=0), r"unroll must be an integer >= 1, got 0"),
    (dict(warmup=-1), r"warmup must be an integer >= 0, got -1"),
    (dict(clip_grad=0.0), r"clip_grad must be a positive max norm or None, got 0.0"),
    (dict(grad_accum=1.5), r"grad_accum must be an integer >= 1, got 1.5"),
])
def test_level_options(options, message):
    with pytest.raises(mlo.LevelError, match=r"@level 'inner': " + message):
        bilevel(**options)


# -- Program and run ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(steps=-1), r"Program.run: steps must be a non-negative integer, got -1"),
    (dict(steps=2, every=0), r"Program.run: every must be a positive integer, got 0"),
    (dict(steps=2, resume=True), r"Program.run: resume=True needs checkpoint='folder'"),
    (dict(steps=2, checkpoint="runs", keep=0), r"Program.run: keep must be a positive integer"),
    (dict(steps=2, validate=lambda p: {"best": "yes"}),
     r"Program.run \(step 2\): validate returned best='yes'; history keeps numbers only"),
    (dict(steps=2, validate=lambda p: [0.5]),
     r"Program.run \(step 2\): validate returned list; return a dict of numbers"),
])
def test_run_arguments(options, message):
    with pytest.raises(mlo.MloError, match=message):
        program().run(progress=False, **options)


def test_checkpoint_folder_of_another_run_without_resume(tmp_path):
    program().run(4, checkpoint=tmp_path, progress=False)
    mlo.registry.clear()
    with pytest.raises(mlo.MloError, match=r"Program.run: the folder .* holds a checkpoint of "
                                           r"step 4, ahead of this program \(step 0\); pass "
                                           r"resume=True"):
        program().run(4, checkpoint=tmp_path, progress=False)


def test_batch_for_a_level_that_does_not_exist():
    with pytest.raises(mlo.GraphError, match=r"Program.step: got a batch for 'iner', but no level "
                                             r"has that name.*Did you mean 'inner'\?"):
        program().step(iner=(torch.ones(2, 3), torch.ones(2, 1)))


def test_unknown_nonfinite_policy():
    with pytest.raises(mlo.MloError, match=r"Program: on_nonfinite must be 'raise' or 'skip', "
                                           r"got 'ignore'"):
        mlo.Program(*bilevel(), on_nonfinite="ignore")
