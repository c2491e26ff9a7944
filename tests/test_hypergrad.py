"""Each method against closed forms on quadratics and ridge regression, in float64."""

import pytest
import torch

import mlo
from mlo.hypergrad import aid_cg, aid_fd, aid_neumann, first_order, itd, sama

torch.manual_seed(0)
N, M = 5, 3
_R = torch.randn(N, N, dtype=torch.float64)
A = _R @ _R.T + N * torch.eye(N, dtype=torch.float64)
B = torch.randn(N, M, dtype=torch.float64)
C = torch.randn(N, dtype=torch.float64)


def inner_cost(inner, outer):
    w, lam = inner["w"], outer["lam"]
    return 0.5 * w @ A @ w - w @ B @ lam


def point():
    w = torch.randn(N, dtype=torch.float64)
    lam = torch.randn(M, dtype=torch.float64)
    return {"w": w}, {"lam": lam}, {"w": w - C}


def test_aid_cg_matches_exact_hypergradient():
    inner, outer, v = point()
    out = aid_cg(iters=N + 5)(inner_cost, inner, outer, v)
    exact = B.T @ torch.linalg.solve(A, v["w"])
    assert torch.allclose(out["lam"], exact, atol=1e-8, rtol=0)


def test_aid_cg_damping_solves_shifted_system():
    inner, outer, v = point()
    out = aid_cg(iters=N + 5, damping=0.7)(inner_cost, inner, outer, v)
    exact = B.T @ torch.linalg.solve(A + 0.7 * torch.eye(N, dtype=torch.float64), v["w"])
    assert torch.allclose(out["lam"], exact, atol=1e-8, rtol=0)


def test_aid_neumann_error_falls_with_iterations():
    inner, outer, v = point()
    exact = B.T @ torch.linalg.solve(A, v["w"])
    alpha = 1.0 / torch.linalg.eigvalsh(A).max().item()
    errors = [(aid_neumann(iters=k, alpha=alpha)(inner_cost, inner, outer, v)["lam"] - exact).norm()
              for k in (1, 5, 20, 200)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6


def test_aid_neumann_takes_alpha_from_lr():
    inner, outer, v = point()
    given = aid_neumann(iters=7, alpha=0.05)(inner_cost, inner, outer, v)
    from_lr = aid_neumann(iters=7)(inner_cost, inner, outer, v, lr=0.05)
    assert torch.equal(given["lam"], from_lr["lam"])


def nonquadratic(inner, outer):
    w, lam = inner["w"], outer["lam"]
    return 0.5 * (torch.exp(lam[:1]) * w ** 2).sum() + torch.sin(w[:M] * lam).sum() + (w ** 4).sum()


def test_aid_fd_matches_its_formula_exactly_or_to_second_order():
    inner, outer, v = point()
    xi = 0.3
    w = inner["w"].clone().requires_grad_()
    lam = outer["lam"].clone().requires_grad_()
    grad_w = torch.autograd.grad(nonquadratic({"w": w}, {"lam": lam}), w, create_graph=True)[0]
    mixed = torch.autograd.grad(grad_w @ v["w"], lam)[0]
    exact = -xi * mixed
    assert torch.allclose(aid_fd(scale=xi)(nonquadratic, inner, outer, v)["lam"], exact,
                          atol=1e-12, rtol=0)
    norm = v["w"].norm()
    errors = [(aid_fd(r=r, scale=xi, exact=False)(nonquadratic, inner, outer, v)["lam"]
               - exact).norm() for r in (norm * 1e-2, norm * 5e-3)]
    assert 1e-9 < errors[0] < 1e-3
    assert 3.0 < errors[0] / errors[1] < 5.0  # halving ε divides a central difference error by 4


def test_aid_fd_defaults_to_inner_learning_rate():
    inner, outer, v = point()
    out = aid_fd()(inner_cost, inner, outer, v, lr=0.1)
    assert torch.allclose(out["lam"], 0.1 * B.T @ v["w"], atol=1e-10)
    with pytest.raises(TypeError, match="aid_fd: no step size"):
        aid_fd()(inner_cost, inner, outer, v)


def test_sama_preconditions_by_adam_second_moment():
    inner, outer, v = point()
    w = torch.nn.Parameter(inner["w"].clone())
    opt = torch.optim.Adam([w], lr=0.1, eps=1e-8)
    w.grad = torch.randn(N, dtype=torch.float64)
    opt.step()
    mirror = mlo.optim.FunctionalOptimizer.from_optimizer(opt, {"w": w})
    state = mirror.state(opt, {"w": w})
    out = sama()(inner_cost, inner, outer, v, lr=0.1, optimizer=mirror, state=state)
    second = state["w"]["exp_avg_sq"] / (1 - 0.999)
    expected = 0.1 * B.T @ (v["w"] / (second.sqrt() + 1e-8))
    assert torch.allclose(out["lam"], expected, rtol=1e-8)


def test_first_order_is_zero():
    inner, outer, v = point()
    assert torch.equal(first_order()(inner_cost, inner, outer, v)["lam"], torch.zeros(M, dtype=torch.float64))


def explicit_unroll(w0, lam, lr, momentum, k):
    """k steps of heavy-ball SGD on the inner cost, differentiable in lam (written out by hand)."""
    w, buffer = w0, None
    for _ in range(k):
        g = A @ w - B @ lam
        buffer = g if buffer is None else momentum * buffer + g
        w = w - lr * buffer
    return w


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_itd_matches_explicit_unroll(momentum):
    inner, outer, v = point()
    lr, k = 0.02, 7
    lam = outer["lam"].clone().requires_grad_()
    expected = torch.autograd.grad(explicit_unroll(inner["w"], lam, lr, momentum, k), lam, v["w"])[0]
    w = torch.nn.Parameter(inner["w"].clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
    mirror = mlo.optim.FunctionalOptimizer.from_optimizer(opt, {"w": w})
    out = itd(steps=k)(inner_cost, inner, outer, v, optimizer=mirror)
    assert torch.allclose(out["lam"], expected, atol=1e-10, rtol=0)


def test_itd_approaches_exact_as_unroll_grows():
    inner, outer, v = point()
    exact = B.T @ torch.linalg.solve(A, v["w"])
    errors = [(itd(steps=k)(inner_cost, inner, outer, v, lr=0.02)["lam"] - exact).norm()
              for k in (5, 50, 500)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_ridge_regression_hyperparameter():
    X, y = torch.randn(40, N, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    Xv, yv = torch.randn(30, N, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    log_lam = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)

    def solution(log_lam):
        return torch.linalg.solve(X.T @ X + log_lam.exp() * torch.eye(N, dtype=torch.float64), X.T @ y)

    w_star = solution(log_lam)
    exact = torch.autograd.grad(0.5 * ((Xv @ w_star - yv) ** 2).sum(), log_lam)[0]

    def ridge(inner, outer):
        w = inner["w"]
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * outer["log_lam"][0].exp() * (w ** 2).sum()

    w = w_star.detach()
    v = {"w": Xv.T @ (Xv @ w - yv)}
    out = aid_cg(iters=2 * N)(ridge, {"w": w}, {"log_lam": log_lam.detach()}, v)
    assert torch.allclose(out["log_lam"], exact, atol=1e-8, rtol=0)


def test_aid_fd_respects_detach_and_its_finite_difference_does_not():
    """Exact: the gradient the inner step applies; exact=False: the cost's value (documented)."""
    with_detach = lambda w, lam: (lam["lam"] * w["w"].detach() * w["w"]).sum()  # noqa: E731
    without = lambda w, lam: (lam["lam"] * w["w"] * w["w"]).sum()  # noqa: E731
    w, lam, v = {"w": torch.tensor([1.0])}, {"lam": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}
    assert torch.allclose(itd(steps=1)(with_detach, w, lam, v, lr=1.0)["lam"], torch.tensor([-1.0]))
    assert torch.allclose(aid_fd(scale=1.0)(with_detach, w, lam, v)["lam"], torch.tensor([-1.0]))
    assert torch.allclose(aid_fd(scale=1.0)(without, w, lam, v)["lam"], torch.tensor([-2.0]))
    assert torch.allclose(aid_fd(scale=1.0, exact=False)(with_detach, w, lam, v)["lam"],
                          torch.tensor([-2.0]))


@pytest.mark.parametrize("exact", [True, False])
def test_aid_fd_with_zero_vector_is_zero(exact):
    inner, outer, v = point()
    zero = {"w": torch.zeros(N, dtype=torch.float64)}
    assert torch.equal(aid_fd(scale=1.0, exact=exact)(inner_cost, inner, outer, zero)["lam"],
                       torch.zeros(M, dtype=torch.float64))
