"""The functional mirrors of torch.optim reproduce the real optimizers step for step."""

import pytest
import torch

import mlo
from mlo.optim import FunctionalOptimizer

CASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=1e-2)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("cls,kwargs", CASES)
def test_functional_step_matches_torch_optimizer(cls, kwargs):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = cls([{"params": [w]}, {"params": [b], "lr": kwargs["lr"] / 2}], **kwargs)
    named = {"w": w, "b": b}
    mirror = FunctionalOptimizer.from_optimizer(opt, named)
    params = {k: p.detach().clone() for k, p in named.items()}
    state = mirror.state(opt, named)
    for _ in range(4):
        grads = {k: torch.randn_like(p) for k, p in named.items()}
        for k, p in named.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state = mirror.step(params, grads, state)
    for k, p in named.items():
        assert torch.allclose(params[k], p.detach(), atol=1e-12, rtol=0), k


def test_functional_step_clips_like_clip_grad_norm():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1.0)
    mirror = FunctionalOptimizer.from_optimizer(opt, {"w": w}, clip_grad=0.5)
    grad = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    w.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([w], 0.5)
    opt.step()
    params, _ = mirror.step({"w": torch.ones(3, dtype=torch.float64)}, {"w": grad}, {})
    assert torch.allclose(params["w"], w.detach(), atol=1e-12)


def test_unsupported_optimizer_names_the_supported_ones():
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(mlo.OptimizerError, match=r"itd: level 'inner' uses RMSprop.*SGD, Adam, AdamW"):
        FunctionalOptimizer.from_optimizer(torch.optim.RMSprop([w]), {"w": w}, level="inner")
    with pytest.raises(mlo.OptimizerError, match=r"amsgrad=False"):
        FunctionalOptimizer.from_optimizer(torch.optim.Adam([w], amsgrad=True), {"w": w})


def test_adam_replay_has_finite_gradient_where_gradient_is_zero():
    w0 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    mirror = FunctionalOptimizer.from_optimizer(opt, {"w": opt.param_groups[0]["params"][0]})
    grads = {"w": torch.stack([lam * 0.0, lam])}  # first coordinate's gradient is exactly zero
    params, _ = mirror.step({"w": w0}, grads, {})
    (d,) = torch.autograd.grad(params["w"].sum(), lam)
    assert torch.isfinite(d)
