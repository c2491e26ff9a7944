"""`itd(recompute=True)`: ITD's reverse pass rebuilt one step at a time from each step's kept
starting point. Same hypergradients as ITD with its whole graph (closed form, hand-written MAML,
and the default inside programs), less memory."""

import sys
from pathlib import Path

import pytest
import torch

import mlo
from mlo.hypergrad import itd
from mlo.optim import FunctionalOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from meta_tasks import assert_params_close, make_tasks, net, run  # noqa: E402
from test_live import _reweighting_program, assert_resumes_bit_for_bit  # noqa: E402
from test_meta import maml_by_hand, maml_program, meta_sgd_program  # noqa: E402

D = torch.float64


def test_closed_form_of_a_quadratic():
    """f = ½w² − wλ, SGD lr ½ from w₀ = 0: θ₂ = (1 − ½²)λ, and with θ₀ = λ, θ₂ = λ."""
    f = lambda w, lam: 0.5 * (w["w"] ** 2).sum() - w["w"] @ lam["lam"]  # noqa: E731
    args = (f, {"w": torch.zeros(1, dtype=D)}, {"lam": torch.ones(1, dtype=D)},
            {"w": torch.ones(1, dtype=D)})
    for offload in (False, True):
        method = itd(steps=2, recompute=True, offload=offload)
        assert torch.equal(method(*args, lr=0.5)["lam"], torch.tensor([0.75], dtype=D))
        start = method(*args, lr=0.5, init=lambda outer: {"w": outer["lam"]})
        assert torch.equal(start["lam"], torch.tensor([1.0], dtype=D))


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("start", [False, True])
def test_equals_the_whole_graph(kind, first_order, start):
    torch.manual_seed(0)
    x, y = torch.randn(20, 5, dtype=D), torch.randn(20, 1, dtype=D)

    def f(w, outer):
        hidden = torch.tanh(x @ w["a"] * outer["s"].exp())
        return ((hidden @ w["b"] - y) ** 2).mean() + 0.1 * (outer["s"] * w["a"].pow(2).sum(0)).sum()

    inner = {"a": torch.randn(5, 4, dtype=D), "b": torch.randn(4, 1, dtype=D)}
    v = {k: torch.randn_like(t) for k, t in inner.items()}
    outer = {"s": 0.1 * torch.randn(4, dtype=D)}
    leaves = [torch.nn.Parameter(t.clone()) for t in inner.values()]
    optimizer = torch.optim.SGD(leaves, lr=0.1, momentum=0.9, weight_decay=0.01) \
        if kind == "SGD" else torch.optim.Adam(leaves, lr=0.05)
    rule = FunctionalOptimizer.from_optimizer(optimizer, dict(zip(inner, leaves)))
    init = (lambda o: {"a": inner["a"] * o["s"], "b": inner["b"] * o["s"].sum().exp()}) \
        if start else None
    whole = itd(steps=6, first_order=first_order)(f, inner, outer, v, optimizer=rule, init=init)
    kept = itd(steps=6, first_order=first_order, recompute=True)(f, inner, outer, v,
                                                                 optimizer=rule, init=init)
    scale = whole["s"].abs().max()
    assert scale > 1e-3 or (first_order and not start)
    assert torch.allclose(kept["s"], whole["s"], atol=1e-12 * max(1.0, float(scale)), rtol=0)


@pytest.mark.parametrize("offload", [False, True])
def test_program_with_the_real_steps_values_equals_the_default(offload):
    """Dropout, BatchNorm, Adam, a scheduler: the kept real-step values give the default's
    hypergradient (which records its graph in the real steps)."""
    results = []
    for method in ("itd", itd(recompute=True, offload=offload)):
        program, net_, scale, _ = _reweighting_program(True, method=method)
        assert bool(program._live) == (method == "itd")
        torch.manual_seed(5)
        for _ in range(7):
            program.step()
        results.append((scale.detach().clone(), [p.detach().clone() for p in net_.parameters()]))
    (scale_default, net_default), (scale_kept, net_kept) = results
    assert torch.allclose(scale_kept, scale_default, atol=1e-12, rtol=0)
    assert scale_kept.abs().max() > 1e-4
    for p, q in zip(net_kept, net_default):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("meta_batch", [1, 3])
def test_maml_matches_the_hand_written_unroll(meta_batch):
    tasks = make_tasks(6)
    program, meta_net = maml_program(tasks, meta_batch, itd(recompute=True))
    assert not program._live
    run(program, tasks)
    assert_params_close(meta_net, maml_by_hand(net(), tasks, meta_batch))


def test_learned_rates_match_the_default():
    tasks, results = make_tasks(4), []
    for hypergrad in ("itd", itd(recompute=True)):
        mlo.registry.clear()
        program, meta_net, rates = meta_sgd_program(tasks, 0.0, hypergrad)
        run(program, tasks)
        results.append((dict(meta_net.named_parameters()), [r.detach().clone() for r in rates]))
    (phi, rates), (phi_kept, rates_kept) = results
    for key, p in phi.items():
        assert torch.allclose(p, phi_kept[key], atol=1e-12, rtol=0), key
    for r, q in zip(rates, rates_kept):
        assert torch.allclose(r, q, atol=1e-12, rtol=0)


def test_resume_inside_a_window_continues_bit_for_bit(tmp_path):
    def check(window):
        assert len(window.points) == 1

    assert_resumes_bit_for_bit(
        tmp_path, lambda: _reweighting_program(True, method=itd(recompute=True)), check)


@pytest.mark.parametrize("every", [2, 3, 7])
def test_keeping_every_kth_point_gives_the_same_hypergradient(every):
    """Segments recomputed from their kept start: the same result, standalone and in a program."""
    torch.manual_seed(0)
    x = torch.randn(12, 3, dtype=D)

    def f(w, outer):
        return ((torch.tanh(x @ w["a"]) - outer["t"]) ** 2).mean() + (w["a"] ** 4).sum()

    inner, outer = {"a": torch.randn(3, 2, dtype=D)}, {"t": torch.randn(12, 2, dtype=D)}
    leaf = torch.nn.Parameter(inner["a"].clone())
    rule = FunctionalOptimizer.from_optimizer(torch.optim.Adam([leaf], lr=0.05), {"a": leaf})
    v = {"a": torch.randn(3, 2, dtype=D)}
    whole = itd(steps=9)(f, inner, outer, v, optimizer=rule)
    kept = itd(steps=9, recompute=True, keep_every=every)(f, inner, outer, v, optimizer=rule)
    assert torch.allclose(kept["t"], whole["t"], atol=1e-12, rtol=0)
    program, net_, scale, _ = _reweighting_program(True, method=itd(recompute=True,
                                                                    keep_every=every))
    torch.manual_seed(5)
    for _ in range(5):  # inside the second window: the point of its second step
        program.step()
    assert [p is None for p in program._windows[("weigh", "fit")].points] == [every != 1]
    for _ in range(2):
        program.step()
    reference, _, scale_default, _ = _reweighting_program(True)
    torch.manual_seed(5)
    for _ in range(7):
        reference.step()
    assert torch.allclose(scale, scale_default, atol=1e-12, rtol=0)


def test_keep_every_is_checked():
    with pytest.raises(ValueError, match="keep_every must be a positive integer"):
        itd(keep_every=2)
    with pytest.raises(ValueError, match="keep_every must be a positive integer"):
        itd(recompute=True, keep_every=0)
