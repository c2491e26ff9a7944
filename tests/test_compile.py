"""@mlo.level(compile=...): real steps run the module compiled by torch.compile, hypergradient
passes run it uncompiled, and the numbers are those of the uncompiled program. The tests use
torch.compile's "eager" backend (a graph captured by TorchDynamo and run as it is), which needs no
C++ compiler; inductor and CUDA graphs are for GPUs (python -m benchmarks.compile --device cuda)."""

import pytest
import torch
from torch import nn

import mlo

captured = []


def counting_backend(graph, example_inputs):
    captured.append(graph)
    return graph.forward


def run(compile_option, method):
    mlo.registry.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    scale = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), unroll=2,
               data=[(x, y)], compile=compile_option)
    def fit(batch, module, weigh):
        inputs, targets = batch
        return ((module(inputs * weigh().exp()) - targets) ** 2).mean()

    @mlo.level(module=scale, optimizer=torch.optim.SGD([scale], lr=0.5), hypergrad=method,
               data=[(x, y)])
    def weigh(batch, fit):
        inputs, targets = batch
        return ((fit(inputs) - targets) ** 2).mean()

    program = mlo.Program(fit, weigh)
    program.run(6, progress=False)
    return scale.detach().clone(), [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("method", ["aid_cg", "aid_fd", "itd"])
def test_compiled_real_steps_give_the_uncompiled_numbers(method):
    torch._dynamo.reset()
    captured.clear()
    plain = run(False, method)
    compiled = run({"backend": counting_backend}, method)
    if method == "itd":  # the lower level's real steps record the unroll: nothing compiled
        assert not captured
    else:
        assert captured  # the real steps ran through a captured graph
    assert torch.allclose(compiled[0], plain[0], atol=1e-12, rtol=0)
    for p, q in zip(compiled[1], plain[1]):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert plain[0].abs().max() > 1e-6


def test_bad_compile_options_are_refused():
    net = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(mlo.LevelError, match="compile must be True, False or a dict"):
        mlo.level(module=net, optimizer=optimizer, compile="max", name="bad")(lambda module: module.weight.sum())
    with pytest.raises(mlo.LevelError, match="compile and activation_checkpointing"):
        mlo.level(module=net, optimizer=optimizer, compile=True,
                  activation_checkpointing=True, name="bad")(lambda module: module.weight.sum())
    lam = nn.Parameter(torch.zeros(2))
    with pytest.raises(mlo.LevelError, match="compile needs an nn.Module"):
        mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1),
                  compile=True, name="bad")(lambda module: module().sum())
