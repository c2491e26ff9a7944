"""Program 1: data reweighting (Meta-Weight-Net shape); see common.py for the mathematics."""

from __future__ import annotations

from ..harness import Case, replace
from .common import Config

TITLE = "Data reweighting (Meta-Weight-Net shape)"
IMPLEMENTATIONS = ("handwritten", "betty_impl", "torchopt_impl", "higher_impl", "mlo_impl")
NOTES = [
    "Classifier SGD lr 0.1 (plain, no momentum, so every library's unrolled optimizer is the same "
    "map); weight net 1-100-1 with sigmoid output, Adam lr 1e-3; batch 128 (quick: 32); "
    "synthetic data: x ~ N(0, I_784), labels from a fixed random linear teacher, 40% of training "
    "labels replaced at random, clean meta batches; fixed seed, same batches in the same order "
    "for every implementation.",
    "One outer step = `unroll` classifier steps + one weight-net step. aid_fd: the exact "
    "identity-Hessian product −ξ ∂²f/∂φ∂θ · v, ξ = classifier lr (0.1); it respects the "
    "`.detach()` of the losses the weight net reads. aid_fd_central: DARTS' central difference "
    "−ξ [∇_φ f(θ+εv) − ∇_φ f(θ−εv)] / 2ε, r = 0.01, ε = r/‖v‖, which differences the cost's value "
    "and so also differentiates the weights' dependence on θ: a different quantity from aid_fd "
    "(at the initial parameters their hypergradients differ by about 70% of the largest entry), "
    "so equal losses are expected only within each method. aid_neumann: 3 terms, α = classifier "
    "lr. aid_cg: 3 iterations, no damping, x0 = 0. All hypergradients are evaluated at the "
    "classifier's current parameters on the batch of its last step.",
    "Betty 0.2.1 (ImplicitProblem): its `darts` is the central difference (aid_fd_central; it has "
    "no exact identity-Hessian product) and scales by ξ = 1 instead of the learning rate; "
    "the Betty implementation multiplies its meta loss by ξ = 0.1 so that it computes the same "
    "hypergradient (the weight net's direct gradient is zero). Betty's `cg` updates the search "
    "direction with the old residual (p ← r_old + βp instead of r_new + βp), so after the first "
    "iteration it is not conjugate gradient: its Δ hypergrad for aid_cg is a real difference, "
    "not rounding (with that one line corrected by a monkeypatch, `python -m benchmarks.betty_cg_check`, Betty agrees with the "
    "hand-written CG to 2e-6 relative). Betty's `IterativeProblem` (itd) does not run with torch 2.x.",
    "TorchOpt 0.7.3: aid_cg / aid_neumann through `torchopt.diff.implicit.custom_root` with "
    "`solve_cg(maxiter=3, rtol=0)` / `solve_inv(ns=True, maxiter=3, alpha=0.1)`; itd through "
    "`torchopt.MetaSGD`. It has no identity-Hessian (aid_fd, aid_fd_central) method.",
    "higher 0.2.1: itd only (`innerloop_ctx` with a differentiable SGD); it has no implicit "
    "differentiation.",
    "mlo's itd inside a Program records the lower level's real steps' graph (the torch "
    "optimizer applies each step; the functional mirror extends the graph) and runs one backward "
    "pass at the upper level's step; the `steps` shown in its repr is the functional core's "
    "default and is not used there.",
    "Δ hypergrad: each implementation is rebuilt from the initial parameters and takes one outer "
    "step; the gradient its weight-net optimizer applies is recorded by a torch.optim step "
    "pre-hook and compared with the hand-written one.",
]

METHODS = (("aid_fd", 1), ("aid_fd_central", 1), ("aid_fd", 5), ("aid_fd_central", 5),
           ("aid_neumann", 1), ("aid_cg", 1), ("itd", 5))


def cases(quick: bool) -> list[Case]:
    if quick:
        base = Config(hidden=(64,), batch=32, train_batches=8, meta_batches=4)
        return [Case(f"quick: mlp 784-64-10, {m}, unroll {u}", m,
                     replace(base, method=m, unroll=u), warmup=1, reps=3) for m, u in METHODS]
    out = []
    for hidden, reps in (((256,), 15), ((1024, 1024), 7)):
        name = "mlp 784-" + "-".join(map(str, hidden)) + "-10"
        for method, unroll in METHODS:
            out.append(Case(f"{name}, {method}, unroll {unroll}", method,
                            Config(method=method, unroll=unroll, hidden=hidden),
                            warmup=2, reps=reps))
    return out

