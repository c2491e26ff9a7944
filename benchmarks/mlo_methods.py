"""Build mlo hypergradient methods with the benchmarks' shared hyperparameters.

Method names are the benchmarks' own: "aid_fd" is mlo's default, exact identity-Hessian product
−ξ ∂²f/∂φ∂θ · v (`aid_fd()`), and "aid_fd_central" its central finite difference
(`aid_fd(r=..., exact=False)`, DARTS' formula, the one Betty's `darts` computes); "itd_recompute"
is `itd(recompute=True)`, "itd_recompute_<k>" `itd(recompute=True, keep_every=k)`. Other options
that this version of `mlo.hypergrad` does not accept are left at its defaults (the harness reports
the resulting method object, whose repr shows what ran).
"""

from __future__ import annotations

import inspect

FACTORIES = {"aid_fd_central": "aid_fd", "itd_recompute": "itd"}  # benchmark method -> factory


def method(name: str, iters: int = 3, r: float = 0.01, alpha: float | None = None):
    """Return `mlo.hypergrad.<factory>(...)` for the benchmark method `name`, with CG/Neumann
    iterations, the finite-difference radius and Neumann α."""
    import mlo

    if name.startswith("itd_recompute_"):  # itd_recompute_<k>: keep every k-th step
        return mlo.hypergrad.itd(recompute=True, keep_every=int(name.rsplit("_", 1)[1]))
    factory = getattr(mlo.hypergrad, FACTORIES.get(name, name))
    wanted = {"aid_cg": {"iters": iters, "damping": 0.0},
              "aid_neumann": {"iters": iters, "alpha": alpha},
              "aid_fd": {},
              "aid_fd_central": {"r": r, "exact": False},
              "itd": {},
              "itd_recompute": {"recompute": True}}[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in wanted.items() if k in accepted and v is not None})


def describe(levels) -> str:
    """'mlo <version>, <method repr>' for the results table: what actually ran."""
    import mlo

    methods = [repr(m) for m in (getattr(level, "method", None) for level in levels) if m]
    return f"mlo {getattr(mlo, '__version__', '?')}, " + ", ".join(methods)
