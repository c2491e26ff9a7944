"""aid_fd and sama against hand-derived closed forms of −ξ ∂²f/∂φ∂θ · v, in float64.

The inner cost is Meta-Weight-Net's: per-sample losses ℓ_i(θ) = ½(a_iᵀθ − b_i)², weighted by
σ(z_i), z_i = φ₀ ℓ_i + φ₁, with the weight reading ℓ_i detached (as in the paper) or not.
"""

import pytest
import torch

import mlo
from mlo.hypergrad import aid_fd, sama

D = torch.float64
torch.manual_seed(0)
S, N = 6, 4  # samples, inner parameters
A = torch.randn(S, N, dtype=D)
B = torch.randn(S, dtype=D)
XI = 0.3


def weighted_cost(detach: bool):
    def cost(inner, outer):
        losses = 0.5 * (A @ inner["w"] - B) ** 2
        read = losses.detach() if detach else losses
        phi = outer["phi"]
        return (torch.sigmoid(phi[0] * read + phi[1]) * losses).mean()
    return cost


def closed_form(theta, phi, v, detach: bool):
    """−ξ ∂/∂φ (∇_θ f · v), derived by hand (no autograd)."""
    residual = A @ theta - B
    losses = 0.5 * residual ** 2
    s = torch.sigmoid(phi[0] * losses + phi[1])
    ds, dds = s * (1 - s), s * (1 - s) * (1 - 2 * s)
    along = residual * (A @ v)  # ∇ℓ_i · v
    if detach:  # ∇_θ f = mean σ(z) r a
        d_phi0, d_phi1 = ds * losses, ds
    else:       # ∇_θ f = mean [σ'(z) φ₀ ℓ + σ(z)] r a
        d_phi0 = dds * phi[0] * losses ** 2 + 2 * ds * losses
        d_phi1 = dds * phi[0] * losses + ds
    return -XI * torch.stack([(d_phi0 * along).mean(), (d_phi1 * along).mean()])


def point(seed=1):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(N, dtype=D, generator=generator)
    phi = torch.randn(2, dtype=D, generator=generator)
    v = torch.randn(N, dtype=D, generator=generator)
    return theta, phi, v


@pytest.mark.parametrize("detach", [True, False])
def test_aid_fd_equals_closed_form_with_and_without_detach(detach):
    theta, phi, v = point()
    out = aid_fd(scale=XI)(weighted_cost(detach), {"w": theta}, {"phi": phi}, {"w": v})
    assert torch.allclose(out["phi"], closed_form(theta, phi, v, detach), atol=1e-10, rtol=0)


def test_finite_difference_option_computes_the_no_detach_quantity():
    """exact=False differences f's value: on the detaching cost it finds the other closed form."""
    theta, phi, v = point()
    out = aid_fd(scale=XI, exact=False, r=1e-4)(weighted_cost(True), {"w": theta}, {"phi": phi},
                                                {"w": v})
    assert torch.allclose(out["phi"], closed_form(theta, phi, v, detach=False), atol=1e-7, rtol=0)
    assert not torch.allclose(out["phi"], closed_form(theta, phi, v, detach=True), atol=1e-3)


@pytest.mark.parametrize("detach", [True, False])
def test_sama_equals_closed_form_of_the_adam_preconditioned_vector(detach):
    theta, phi, v = point()
    w = torch.nn.Parameter(theta.clone())
    adam = torch.optim.Adam([w], lr=XI, eps=1e-8)
    for seed in (2, 3):
        w.grad = torch.randn(N, dtype=D, generator=torch.Generator().manual_seed(seed))
        adam.step()
    mirror = mlo.optim.FunctionalOptimizer.from_optimizer(adam, {"w": w})
    state = mirror.state(adam, {"w": w})
    out = sama()(weighted_cost(detach), {"w": theta}, {"phi": phi}, {"w": v}, lr=XI,
                 optimizer=mirror, state=state)
    second = state["w"]["exp_avg_sq"] / (1 - 0.999 ** 2)
    preconditioned = v / (second.sqrt() + 1e-8)
    assert torch.allclose(out["phi"], closed_form(theta, phi, preconditioned, detach),
                          atol=1e-10, rtol=0)


class Square(torch.autograd.Function):
    """x² with a hand-written (differentiable) backward and no forward-mode rule."""

    @staticmethod
    def forward(x):
        return x ** 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_aid_fd_respects_no_grad_regions_and_custom_functions():
    theta, phi, v = point()
    phi = torch.randn(N, dtype=D)

    def cost(inner, outer):  # ∇_θ f = φ ∘ 2θ: the no_grad term has no θ-gradient
        with torch.no_grad():
            constant = inner["w"].sum()
        return (outer["phi"] * Square.apply(inner["w"])).sum() + constant * outer["phi"].sum()

    out = aid_fd(scale=XI)(cost, {"w": theta}, {"phi": phi}, {"w": v})
    assert torch.allclose(out["phi"], -XI * 2 * theta * v, atol=1e-12, rtol=0)


@pytest.mark.parametrize("detach", [True, False])
def test_the_exact_product_is_taken_in_forward_mode_where_it_equals_reverse_mode(detach):
    """Forward-over-reverse (tangents stop at .detach()) gives the closed form by itself."""
    from mlo.hypergrad.fd import _forward_over_reverse
    theta, phi, v = point()
    out = _forward_over_reverse(weighted_cost(detach), {"w": theta}, {"phi": phi}, {"w": v})
    assert out is not None
    assert torch.allclose(-XI * out["phi"], closed_form(theta, phi, v, detach),
                          atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("method", [aid_fd, sama])
def test_both_modes_give_the_closed_form(mode, method):
    theta, phi, v = point()
    out = method(scale=XI, mode=mode)(weighted_cost(True), {"w": theta}, {"phi": phi}, {"w": v})
    assert torch.allclose(out["phi"], closed_form(theta, phi, v, True), atol=1e-12, rtol=0)


def test_auto_mode_takes_forward_over_reverse_on_large_lower_levels(monkeypatch):
    import mlo.hypergrad.fd as fd
    calls = []
    original = fd._forward_over_reverse
    monkeypatch.setattr(fd, "_forward_over_reverse",
                        lambda *args: calls.append(1) or original(*args))
    theta, phi, v = point()
    aid_fd(scale=XI)(weighted_cost(True), {"w": theta}, {"phi": phi}, {"w": v})
    assert not calls  # 4 parameters: reverse mode
    monkeypatch.setattr(fd, "FORWARD_MIN_PARAMS", 4)
    out = aid_fd(scale=XI)(weighted_cost(True), {"w": theta}, {"phi": phi}, {"w": v})
    assert calls and torch.allclose(out["phi"], closed_form(theta, phi, v, True), atol=1e-12,
                                    rtol=0)
    with pytest.raises(ValueError, match="mode"):
        aid_fd(mode="sideways")


@pytest.mark.parametrize("case", ["no_grad", "custom_function"])
def test_reverse_mode_where_forward_mode_would_differ(case):
    """A no_grad region (which tangents would cross) or an autograd function without a jvp:
    the product is taken in reverse mode, and equals ∇_θ f = φ ∘ 2θ's mixed product."""
    from mlo.hypergrad.fd import _forward_over_reverse
    theta, _, v = point()
    phi = torch.randn(N, dtype=D)

    def cost(inner, outer):
        if case == "no_grad":
            with torch.no_grad():
                constant = inner["w"].sum()
            return (outer["phi"] * inner["w"] ** 2).sum() + constant * outer["phi"].sum()
        return (outer["phi"] * Square.apply(inner["w"])).sum()

    assert _forward_over_reverse(cost, {"w": theta}, {"phi": phi}, {"w": v}) is None
    out = aid_fd(scale=XI, mode="forward")(cost, {"w": theta}, {"phi": phi}, {"w": v})
    assert torch.allclose(out["phi"], -XI * 2 * theta * v, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["aid_fd", "sama"])
def test_program_reweighting_hypergradient_equals_closed_form(method):
    """Through the DSL: one inner SGD step, then the weight net's step on −η ∂²f/∂φ∂θ · ∇_θ F."""
    theta0, phi0, _ = point(seed=4)
    w, phi = torch.nn.Parameter(theta0.clone()), torch.nn.Parameter(phi0.clone())
    meta_a, meta_b = torch.randn(3, N, dtype=D), torch.randn(3, dtype=D)

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=XI))
    def inner(module, weighting):
        losses = 0.5 * (A @ module() - B) ** 2
        z = weighting()[0] * losses.detach() + weighting()[1]
        return (torch.sigmoid(z) * losses).mean()

    @mlo.level(module=phi, optimizer=torch.optim.SGD([phi], lr=1.0), hypergrad=method)
    def weighting(inner):
        return 0.5 * ((meta_a @ inner() - meta_b) ** 2).mean()

    mlo.Program(inner, weighting).step()
    residual = A @ theta0 - B
    s = torch.sigmoid(phi0[0] * 0.5 * residual ** 2 + phi0[1])
    theta1 = theta0 - XI * (s * residual) @ A / S
    v = meta_a.T @ (meta_a @ theta1 - meta_b) / 3
    assert torch.allclose(w.detach(), theta1, atol=1e-12, rtol=0)
    assert torch.allclose(phi0 - phi.detach(), closed_form(theta1, phi0, v, detach=True),
                          atol=1e-10, rtol=0)
