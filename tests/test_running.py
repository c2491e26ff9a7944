"""run(): loggers, validation with early stopping, progress; per-level grad_accum, clip_grad,
schedulers and the non-finite guard."""

import csv
import json

import pytest
import torch
from torch import nn

import mlo


@pytest.fixture(autouse=True)
def _clean_registry():
    mlo.registry.clear()
    yield
    mlo.registry.clear()


def regression(setup=None, **options):
    """A one-level linear regression; `setup(net)` may return the optimizer and scheduler."""
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    options.update(setup(net) if setup else {})
    x = torch.randn(8, 3, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    opt = options.pop("optimizer", None) or torch.optim.SGD(net.parameters(), lr=0.1)

    @mlo.level(module=net, optimizer=opt, data=data, **options)
    def fit(batch, module):
        inputs, targets = batch
        error = module(inputs) - targets
        return {"loss": (error ** 2).mean(), "max_error": error.abs().max()}

    return fit, net, data


def test_jsonl_and_csv_loggers_write_every_step(tmp_path):
    fit, _, _ = regression()
    program = mlo.Program(fit)
    program.run(3, log=tmp_path / "m.jsonl", progress=False)
    program.run(2, log=str(tmp_path / "m.csv"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["fit/loss"] == program.history["fit"][2]["loss"]
    assert "fit/max_error" in rows[0]
    table = list(csv.reader(open(tmp_path / "m.csv")))
    assert table[0] == ["step", "name", "value"] and len(table) == 1 + 2 * 2


def test_unknown_log_target_is_a_clear_error():
    fit, _, _ = regression()
    with pytest.raises(mlo.MloError, match=r"Program.run: log must be a path ending in .jsonl"):
        mlo.Program(fit).run(1, log="metrics.txt")


def test_early_stopping_on_a_named_metric():
    fit, _, _ = regression()
    program = mlo.Program(fit)
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9])
    history = program.run(100, validate=lambda p: {"accuracy": next(scores)}, every=5,
                          monitor="accuracy", mode="max", patience=3, progress=False)
    assert program.stopped_at == 25  # best 0.6 at step 10, then three validations without gain
    assert [v["step"] for v in history["validate"]] == [5, 10, 15, 20, 25]


def test_progress_bar_when_forced(capsys):
    pytest.importorskip("tqdm")
    fit, _, _ = regression()
    mlo.Program(fit).run(4, progress=True)
    assert "4/4" in capsys.readouterr().err


def test_grad_accum_equals_one_step_on_the_concatenated_batch():
    fit, net, data = regression(grad_accum=2)
    mlo.Program(fit).step()
    torch.manual_seed(0)
    reference = nn.Linear(3, 1).double()
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    ((reference(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    assert torch.allclose(net.weight, reference.weight, atol=1e-12)


def test_clip_grad_and_scheduler_act_on_the_given_optimizer():
    def setup(net):
        opt = torch.optim.SGD([{"params": [net.weight], "lr": 0.1},
                               {"params": [net.bias], "lr": 0.01}])
        return {"optimizer": opt,
                "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)}

    fit, net, data = regression(setup, clip_grad=1e-3)
    opt = fit.optimizer
    before = torch.cat([net.weight.detach().ravel(), net.bias.detach()])
    program = mlo.Program(fit)
    program.step()
    after = torch.cat([net.weight.detach().ravel(), net.bias.detach()])
    assert fit.optimizer is opt and len(opt.param_groups) == 2 and program.steps["fit"] == 1
    assert (after - before).norm() <= 0.1 * 1e-3 + 1e-12  # clipped to norm 1e-3, lr at most 0.1
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[1]["lr"] == 0.005


def test_one_cycle_scheduler_steps_once_per_optimizer_step():
    def setup(net):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt,
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)}

    fit, _, _ = regression(setup, grad_accum=2)
    mlo.Program(fit).run(4, progress=False)
    assert fit.options.scheduler.last_epoch == 4
    assert "momentum_buffer" in fit.optimizer.state[fit.optimizer.param_groups[0]["params"][0]]


def test_nonfinite_loss_skip_mode_counts_and_does_not_update():
    fit, net, _ = regression()
    program = mlo.Program(fit, on_nonfinite="skip")
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    program.step()
    assert program.skipped["fit"] == 1 and net.weight.grad is None


def test_tensorboard_logger_writes_events_or_says_what_to_install(tmp_path):
    fit, _, _ = regression()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(mlo.MloError, match=r"TensorBoard: the tensorboard package is not installed"):
            mlo.loggers.TensorBoard(tmp_path)
        return
    writer = mlo.loggers.TensorBoard(tmp_path)
    mlo.Program(fit).run(2, log=writer, progress=False)
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_wandb_logger_says_what_to_install():
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed; it would need an account to log")
    except ImportError:
        with pytest.raises(mlo.MloError, match=r"WandB: the wandb package is not installed"):
            mlo.loggers.WandB(project="x")


def test_resume_makes_steps_the_total_and_keeps_the_newest_checkpoints(tmp_path):
    fit, _, _ = regression()
    program = mlo.Program(fit)
    program.run(7, checkpoint=tmp_path, checkpoint_every=2, keep=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000006.pt", "step-000000007.pt"]
    program.run(7, checkpoint=tmp_path, resume=True, progress=False)
    assert program.global_step == 7  # already at the total: nothing to do
    mlo.registry.clear()
    fit, net, _ = regression()
    resumed = mlo.Program(fit)
    resumed.run(10, checkpoint=tmp_path, checkpoint_every=2, resume=True, progress=False)
    assert resumed.global_step == 10 and [h["step"] for h in resumed.history["fit"]] == \
        list(range(1, 11))
    assert mlo.Program.load(tmp_path, fit).global_step == 10  # a folder stands for its newest


def test_restore_best_loads_the_state_of_the_best_validation(tmp_path):
    fit, net, _ = regression()
    scores, seen = iter([0.5, 0.9, 0.7, 0.6, 0.8]), {}

    def validate(program):
        seen[program.global_step] = net.weight.detach().clone()
        return {"accuracy": next(scores)}

    for folder in (None, tmp_path):
        seen.clear()
        scores = iter([0.5, 0.9, 0.7, 0.6, 0.8])
        program = mlo.Program(fit)
        start = program.global_step
        program.run(50, validate=validate, every=2, monitor="accuracy", mode="max", patience=2,
                    restore_best=True, checkpoint=folder, progress=False)
        assert program.stopped_at == start + 8 and program.best_step == start + 4
        assert program.global_step == start + 4 and torch.equal(net.weight, seen[start + 4])
        assert len(program.history["validate"]) == 2  # the history as it was at the best step


def test_resuming_a_run_that_stopped_early_does_not_train_on(tmp_path):
    fit, net, _ = regression()
    scores = iter([0.5, 0.4, 0.3])
    options = dict(validate=lambda p: {"accuracy": next(scores)}, every=1, monitor="accuracy",
                   mode="max", patience=2, checkpoint=tmp_path, resume=True, progress=False)
    program = mlo.Program(fit)
    program.run(20, **options)
    weight = net.weight.detach().clone()
    program.run(20, **options)
    assert program.stopped_at == 3 and program.global_step == 3 and torch.equal(net.weight, weight)


@pytest.mark.parametrize("options, message", [
    (dict(resume=True), r"resume=True needs checkpoint='folder'"),
    (dict(restore_best=True), r"restore_best=True needs early stopping"),
    (dict(checkpoint="x", keep=0), r"keep must be a positive integer, got 0"),
    (dict(checkpoint="x", checkpoint_every=1.5), r"checkpoint_every must be a positive integer"),
])
def test_checkpoint_options_are_checked(options, message):
    fit, _, _ = regression()
    with pytest.raises(mlo.MloError, match=r"Program.run: " + message):
        mlo.Program(fit).run(3, progress=False, **options)


def test_checkpoint_folder_that_is_a_file_is_refused(tmp_path):
    fit, _, _ = regression()
    (tmp_path / "run").write_text("")
    with pytest.raises(mlo.MloError, match=r"checkpoint='.*run' is a file; pass a folder"):
        mlo.Program(fit).run(3, checkpoint=tmp_path / "run", progress=False)


def test_validate_must_return_numbers():
    fit, _, _ = regression()
    with pytest.raises(mlo.MloError, match=r"Program.run \(step 2\): validate returned "
                                           r"name='best'; history keeps numbers only"):
        mlo.Program(fit).run(3, validate=lambda p: {"name": "best"}, every=2, progress=False)


def test_one_line_per_validation_above_the_bar(capsys):
    pytest.importorskip("tqdm")
    fit, _, _ = regression()
    mlo.Program(fit).run(4, validate=lambda p: {"score": float(p.global_step)}, every=2,
                         progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines == ["step 2/4: validate/score=2", "step 4/4: validate/score=4"]


def test_a_full_disk_skips_a_periodic_checkpoint_with_a_warning(tmp_path, monkeypatch):
    fit, _, _ = regression()
    save, calls = torch.save, []

    def full_once(state, file):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return save(state, file)

    monkeypatch.setattr(torch, "save", full_once)
    with pytest.warns(RuntimeWarning, match=r"Program.run \(step 2\): could not save a "
                                            r"checkpoint .*No space left.*the run goes on"):
        mlo.Program(fit).run(6, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004.pt", "step-000000006.pt"]


def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path):
    fit, _, _ = regression()
    mlo.Program(fit).run(4, checkpoint=tmp_path, checkpoint_every=2, progress=False)
    newest = tmp_path / "step-000000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged outside mlo
    mlo.registry.clear()
    fit, _, _ = regression()
    program = mlo.Program(fit)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-000000004.pt: .*truncated"):
        program.run(4, checkpoint=tmp_path, resume=True, progress=False)
    assert program.global_step == 4 and program.history["fit"][0]["step"] == 1
