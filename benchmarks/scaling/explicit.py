"""The exact implicit hypergradient with explicit matrices: −Mᵀ H⁻¹ v with the Hessian
H = ∂²f/∂w² (torch.func.hessian) and the mixed Jacobian M = ∂(∇_w f)/∂λ (torch.func.jacrev),
both d×d, and a dense solve. O(d²) memory and O(d³) time: the baseline the matrix-free methods
avoid; run only where 3·d² floats fit the harness's memory budget."""

from __future__ import annotations

import torch
from torch.func import grad, hessian, jacrev

from .common import Problem, inner_cost

UNSUPPORTED = {m: "explicit matrices are a method of their own (row 'explicit')"
               for m in ("aid_cg", "aid_neumann", "aid_fd", "aid_fd_central", "itd")}


def hypergradient(method: str, p: Problem):
    def run():
        f = lambda w, lam: inner_cost(w, lam, p.x, p.y)
        h = hessian(f, argnums=0)(p.w, p.lam)
        m = jacrev(grad(f, argnums=0), argnums=1)(p.w, p.lam)
        return -(m.T @ torch.linalg.solve(h, p.v))

    return run
