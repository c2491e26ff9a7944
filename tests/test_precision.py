"""Mixed precision per level: bf16 autocast on CPU, fp16 loss scaling with skipped overflows."""

import pytest
import torch
from torch import nn

import mlo

# fp16 runs on CPU here (with the documented warning) so that loss scaling is tested without a GPU
pytestmark = pytest.mark.filterwarnings("ignore::mlo.MloWarning")


@pytest.fixture(autouse=True)
def _clean_registry():
    mlo.registry.clear()
    yield
    mlo.registry.clear()


def bilevel(precision, blow_up=lambda: 1.0, hypergrad="aid_fd"):
    torch.manual_seed(0)
    net, scale = nn.Linear(8, 1), nn.Parameter(torch.zeros(8))
    data = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(4)]
    seen = []

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=data,
               **precision)
    def inner(batch, module, outer):
        x, y = batch
        out = module(x * outer().exp())
        seen.append(out.dtype)
        return ((out.float() - y) ** 2).mean() * blow_up()

    @mlo.level(module=scale, optimizer=torch.optim.SGD([scale], lr=0.1), data=data,
               hypergrad=hypergrad, **precision)
    def outer(batch, inner):
        x, y = batch
        return ((inner(x).float() - y) ** 2).mean()

    return mlo.Program(inner, outer), net, scale, seen


def test_bf16_runs_the_cost_in_bfloat16_and_tracks_fp32():
    program, net, scale, seen = bilevel({"bf16": True})
    reference, ref_net, ref_scale, _ = bilevel({})
    for _ in range(3):
        program.step()
        reference.step()
    assert torch.bfloat16 in seen
    assert net.weight.dtype == torch.float32  # parameters stay in float32
    assert torch.allclose(net.weight, ref_net.weight, atol=3e-2)
    assert torch.allclose(scale, ref_scale, atol=3e-2)
    assert not torch.equal(scale, ref_scale)  # the bf16 run really computed in another precision


def test_fp16_overflow_skips_the_step_and_counts_it():
    factor = {"value": 1.0}
    program, net, _, seen = bilevel({"fp16": True}, blow_up=lambda: factor["value"],
                                    hypergrad="first_order")
    precision = program._precision["inner"]
    for _ in range(20):  # the scaler backs off from its initial scale until steps apply
        before = net.weight.detach().clone()
        program.step()
        if not torch.equal(net.weight, before):
            break
    assert torch.float16 in seen and not torch.equal(net.weight, before)
    before, overflows, scale = net.weight.detach().clone(), precision.overflows, precision.scale
    factor["value"] = 1e30  # the scaled fp16 gradient overflows
    program.step()
    assert torch.equal(net.weight, before)
    assert precision.overflows == overflows + 1 and precision.scale == scale / 2
    factor["value"] = 1.0
    program.step()
    assert not torch.equal(net.weight, before)


def test_finite_difference_radius_grows_for_half_precision():
    from mlo.hypergrad.fd import radius_for
    assert radius_for(0.01, torch.float32) == 0.01
    assert 0.01 < radius_for(0.01, torch.float16) < radius_for(0.01, torch.bfloat16) < 1.0


def test_fp16_upper_level_overflow_in_its_hypergradient_is_a_skipped_step():
    torch.manual_seed(0)
    net, wnet = nn.Linear(8, 3), nn.Sequential(nn.Linear(1, 4), nn.Sigmoid())
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=data)
    def classifier(batch, module, weighting):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(module(x), y, reduction="none")
        return (weighting(loss.detach()[:, None]).mean(1) * loss).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.SGD(wnet.parameters(), lr=0.1), data=data,
               hypergrad="aid_fd", fp16=True)
    def weighting(batch, classifier):
        x, y = batch
        return 1e4 * torch.nn.functional.cross_entropy(classifier(x), y)  # × 65536 overflows fp16

    program = mlo.Program(classifier, weighting)
    precision = program._precision["weighting"]
    before = [p.detach().clone() for p in wnet.parameters()]
    program.step()
    assert precision.overflows == 1 and precision.scale == 32768.0
    assert all(torch.equal(a, b) for a, b in zip(before, wnet.parameters()))
    for _ in range(12):
        program.step()
    assert program.skipped["weighting"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, wnet.parameters()))
