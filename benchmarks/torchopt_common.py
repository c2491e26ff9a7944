"""What the TorchOpt implementations share: the implicit-differentiation wrapper of a solver."""

from __future__ import annotations

import torchopt


def implicit(config, optimality, solve):
    """Wrap `solve` in `custom_root(optimality)` with CG or Neumann, as `config.method` says."""
    if config.method == "aid_cg":
        linear = torchopt.linear_solve.solve_cg(maxiter=config.iters, rtol=0.0)
    else:
        linear = torchopt.linear_solve.solve_inv(ns=True, maxiter=config.iters,
                                                 alpha=config.inner_lr)
    return torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=linear)(solve)
