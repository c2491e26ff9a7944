"""Build mlo hypergradient methods with the benchmarks' shared hyperparameters.

Options that this version of `mlo.hypergrad` does not accept are left at its defaults (the
harness reports the resulting method object, whose repr shows what ran).
"""

from __future__ import annotations

import inspect


def method(name: str, iters: int = 3, r: float = 0.01, alpha: float | None = None):
    """Return `mlo.hypergrad.<name>(...)` with CG/Neumann iterations, FD radius and Neumann α."""
    import mlo

    factory = getattr(mlo.hypergrad, name)
    wanted = {"aid_cg": {"iters": iters, "damping": 0.0},
              "aid_neumann": {"iters": iters, "alpha": alpha},
              "aid_fd": {"r": r},
              "itd": {}}[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in wanted.items() if k in accepted and v is not None})


def describe(levels) -> str:
    """'mlo <version>, <method repr>' for the results table: what actually ran."""
    import mlo

    methods = [repr(m) for m in (getattr(level, "method", None) for level in levels) if m]
    return f"mlo {getattr(mlo, '__version__', '?')}, " + ", ".join(methods)
