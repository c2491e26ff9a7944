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
