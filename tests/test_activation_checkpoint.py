"""Activation checkpointing of a level's module: the same hypergradients with every method, the
forward recomputed, bad values refused at decoration."""

import pytest
import torch
from torch import nn

import mlo

METHODS = ["itd", "aid_cg", "aid_neumann", "aid_fd", mlo.hypergrad.aid_fd(exact=False), "sama",
           "first_order"]


class Wrapped(nn.Module):
    """A module that is not a Sequential: checkpointed as one segment."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


def run(method, recompute: bool, sequential: bool, steps: int = 3):
    """Bilevel per-feature weight decay over an MLP with dropout (a Sequential of 5 children,
    checkpointed in segments, or wrapped in a module); return the parameters, the upper level's
    last gradient and how often the first layer ran."""
    mlo.registry.clear()
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3),
                           nn.Linear(3, 1)).double()
    calls = []
    layers[0].register_forward_hook(lambda *_: calls.append(1))
    net = layers if sequential else Wrapped(layers)
    first = "0.weight" if sequential else "layers.0.weight"
    decay = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    x = torch.randn(steps * 2, 8, 4, dtype=torch.float64)
    y = x.sum(-1, keepdim=True).sin()
    train, val = list(zip(x[:steps], y[:steps])), list(zip(x[steps:], y[steps:]))

    @mlo.level(module=net, optimizer=torch.optim.Adam(net.parameters(), lr=0.05), data=train,
               unroll=2, activation_checkpointing=recompute)
    def inner(batch, module, outer):
        x, y = batch
        penalty = (outer().exp() * module.params[first].pow(2).sum(1)).sum()
        return ((module(x) - y) ** 2).mean() + 1e-2 * penalty

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.5), data=val,
               hypergrad=method)
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    torch.manual_seed(1)
    for _ in range(2 * steps):
        program.step()
    params = torch.cat([p.detach().ravel() for p in net.parameters()] + [decay.detach()])
    grad = decay.grad.clone() if decay.grad is not None else torch.zeros_like(decay)  # first_order
    return params, grad, len(calls)


@pytest.mark.parametrize("sequential", [True, False], ids=["segments", "whole"])
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_method_gives_the_same_hypergradient_with_checkpointing(method, sequential):
    plain, plain_grad, plain_calls = run(method, False, sequential)
    recomputed, grad, calls = run(method, True, sequential)
    assert torch.allclose(grad, plain_grad, atol=1e-10, rtol=0)
    assert torch.allclose(recomputed, plain, atol=1e-10, rtol=0)
    if method != "first_order":
        assert plain_grad.abs().max() > 1e-6  # a hypergradient that can differ
    assert calls > plain_calls  # the forward ran again in backward passes


def test_checkpointing_is_refused_for_a_tensor_level_and_a_non_bool():
    decay = nn.Parameter(torch.zeros(3))
    with pytest.raises(mlo.LevelError, match=r"@level 'outer': activation_checkpointing=True "
                                             r"needs an nn\.Module, but the module is a tensor"):
        @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.1),
                   activation_checkpointing=True)
        def outer(inner):
            return inner(decay).sum()
    net = nn.Linear(2, 1)
    with pytest.raises(mlo.LevelError, match=r"@level 'inner': activation_checkpointing must be "
                                             r"True or False, got 'yes'"):
        @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                   activation_checkpointing="yes")
        def inner(module):
            return module(torch.ones(2)).sum()
