"""Hand-written matrix-free solvers on lists of tensors, shared by the hand-written baselines.

Both run a fixed number of iterations with no host synchronisation (no `.item()`), so they cost
exactly `iters` calls of `matvec` (Hessian-vector products).
"""

from __future__ import annotations

import torch


def _dot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def cg(matvec, b, iters: int):
    """Conjugate gradient for A x = b from x = 0 (A symmetric positive definite)."""
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rs = _dot(r, r)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / _dot(p, ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


def neumann(matvec, b, iters: int, alpha: float):
    """A⁻¹ b ≈ α Σ_{j=0..iters} (I − αA)^j b."""
    term = list(b)
    total = list(b)
    for _ in range(iters):
        term = [t - alpha * h for t, h in zip(term, matvec(term))]
        total = [s + t for s, t in zip(total, term)]
    return [alpha * s for s in total]
