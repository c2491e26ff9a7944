"""The matrix-free solvers on parameter dicts."""

import torch

from mlo.linsolve import cg, neumann


def spd(n):
    r = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    return r @ r.T + n * torch.eye(n, dtype=torch.float64)


def test_cg_solves_spd_system_over_several_tensors():
    a, b = spd(4), spd(3)
    rhs = {"x": torch.ones(4, dtype=torch.float64), "y": torch.arange(3.0, dtype=torch.float64)}
    out = cg(lambda v: {"x": a @ v["x"], "y": b @ v["y"]}, rhs, iters=20)
    assert torch.allclose(a @ out["x"], rhs["x"], atol=1e-10)
    assert torch.allclose(b @ out["y"], rhs["y"], atol=1e-10)


def test_cg_after_convergence_stays_finite_and_exact():
    a = spd(3)
    rhs = {"x": torch.ones(3, dtype=torch.float64)}
    out = cg(lambda v: {"x": a @ v["x"]}, rhs, iters=50)
    assert torch.allclose(out["x"], torch.linalg.solve(a, rhs["x"]), atol=1e-12)


def test_cg_on_indefinite_matrix_matches_plain_recurrence():
    a = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    rhs = {"x": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}
    out = cg(lambda v: {"x": a @ v["x"]}, rhs, iters=3)
    assert torch.isfinite(out["x"]).all()
    assert torch.allclose(a @ out["x"], rhs["x"], atol=1e-10)  # CG still solves it in n steps


def test_neumann_converges_for_small_alpha():
    a = spd(3)
    alpha = 0.9 / torch.linalg.eigvalsh(a).max().item()
    rhs = {"x": torch.ones(3, dtype=torch.float64)}
    out = neumann(lambda v: {"x": a @ v["x"]}, rhs, iters=2000, alpha=alpha)
    assert torch.allclose(out["x"], torch.linalg.solve(a, rhs["x"]), atol=1e-8)
