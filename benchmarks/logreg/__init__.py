"""Program 2: per-feature weight-decay logistic regression; see common.py for the mathematics."""

from __future__ import annotations

from ..harness import Case, replace
from .common import Config

TITLE = "Per-feature weight-decay logistic regression"
IMPLEMENTATIONS = ("handwritten", "betty_impl", "torchopt_impl", "higher_impl", "mlo_impl")
NOTES = [
    "Inner: mean logistic loss + ½ Σ exp(λ_j) w_j², full-batch SGD lr 0.1 warm-started, "
    "`unroll` steps per outer step; outer: validation logistic loss, Adam lr 0.05 on λ "
    "(initial exp(λ) = 0.01). Synthetic data: x ~ N(0, I_d), y ~ Bernoulli(sigmoid(xᵀw_true)), "
    "1,000 training and 1,000 validation samples (quick: 200), fixed seed.",
    "aid_cg / aid_neumann: 10 iterations (CG from 0, no damping; Neumann α = inner lr); "
    "aid_fd: the exact −ξ ∂²f/∂λ∂w · v, ξ = inner lr; aid_fd_central: its central difference, "
    "r = 0.01, ε = r/‖v‖ (the cost has no `.detach()`, so both compute the same quantity, up to "
    "the difference's O(ε²) error); itd: reverse mode through the `unroll` steps.",
    "Betty: `darts` is aid_fd_central (Betty has no exact aid_fd) and uses ξ = 1, so the Betty "
    "implementation multiplies its validation loss by ξ = 0.1 to compute the same hypergradient; Betty's `cg` updates the search direction with "
    "the old residual, so its aid_cg is not textbook CG (Δ hypergrad is a real difference; with that line "
    "corrected by a monkeypatch, `python -m benchmarks.betty_cg_check`, it agrees with the hand-written CG to 3e-7 relative); "
    "Betty's itd (IterativeProblem) does not run with torch 2.x. TorchOpt has no aid_fd or "
    "aid_fd_central; higher has only itd.",
    "mlo's itd inside a Program records the lower level's real steps' graph (the torch "
    "optimizer applies each step; the functional mirror extends the graph) and runs one backward "
    "pass at the upper level's step; the `steps` shown in its repr is the functional core's "
    "default and is not used there.",
    "Δ hypergrad: each implementation is rebuilt from the initial parameters and takes one outer "
    "step; the gradient its λ optimizer applies is recorded by a torch.optim step pre-hook and "
    "compared with the hand-written one.",
]

METHODS = ("itd", "aid_cg", "aid_neumann", "aid_fd", "aid_fd_central")


def cases(quick: bool) -> list[Case]:
    if quick:
        base = Config(features=100, samples=200, unroll=10)
        return [Case(f"quick: d = 100, {m}, unroll 10", m, replace(base, method=m),
                     warmup=1, reps=3) for m in METHODS]
    out = []
    for features, reps in ((100, 9), (10_000, 5)):
        for method in METHODS:
            out.append(Case(f"d = {features:,}, {method}, unroll 100", method,
                            Config(method=method, features=features), warmup=1, reps=reps))
    return out

