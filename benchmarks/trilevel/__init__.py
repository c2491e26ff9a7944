"""Program 3: a three-level program (pretrain / finetune / reweight); see common.py."""

from __future__ import annotations

from ..harness import Case, replace
from .common import Config

TITLE = "Three-level program (domain-adaptation shape)"
IMPLEMENTATIONS = ("handwritten", "betty_impl", "mlo_impl")
NOTES = [
    "pretrain: reweighted CE on noisy source data (weight net 1-100-1 on the per-sample loss), "
    "MLP 784-256-10 (quick: 784-64-10), SGD lr 0.1; finetune: CE on target data + "
    "(0.1/2)‖θ_f − θ_p‖², SGD lr 0.1; reweight: target validation CE of finetune + of pretrain, "
    "Adam lr 1e-3. Batch 128 (quick 32), one step of each level per global step.",
    "aid_fd: the exact −ξ ∂²f/∂φ∂θ · v, ξ = the learning rate of the level whose best response "
    "is differentiated; aid_fd_central: its central difference, r = 0.01, ε = r/‖v‖ (it also "
    "differentiates the pretrain weights' dependence on θ_p through the `.detach()`, so it is a "
    "different quantity); aid_cg: 3 CG iterations on each lower level's Hessian.",
    "Betty can express this program (ImplicitProblem with u2l/l2u dependencies; cg requires that "
    "the lower levels have no paths of their own, which holds here). Its `darts` is "
    "aid_fd_central (it has no exact aid_fd) and uses ξ = 1: "
    "the reweight cost's two terms are scaled by ξ_f·ξ_p and ξ_p to compute the same "
    "hypergradient. Betty evaluates the pretrain VJP once per path (two VJPs) where the "
    "hand-written chain sums the paths first (one VJP); for aid_fd_central the two agree up to "
    "finite-difference error, for aid_cg they differ because a fixed number of CG iterations "
    "is not linear in its right-hand side, and Betty's CG uses the old residual in its "
    "direction update.",
    "TorchOpt and higher are not run here: neither has a notion of more than two levels "
    "(TorchOpt's implicit differentiation and higher's unrolled loops are bilevel building "
    "blocks; nesting them by hand would be a hand-written implementation).",
    "Δ hypergrad: one global step from the initial parameters; the gradient the reweight "
    "optimizer applies, recorded by a torch.optim step pre-hook, against the hand-written one.",
]

METHODS = ("aid_fd", "aid_fd_central", "aid_cg")


def cases(quick: bool) -> list[Case]:
    if quick:
        base = Config(hidden=64, batch=32, batches=4)
        return [Case(f"quick: 784-64-10 x2, {m}", m, replace(base, method=m), warmup=1, reps=3)
                for m in METHODS]
    return [Case(f"784-256-10 x2, {m}", m, Config(method=m), warmup=2, reps=15)
            for m in METHODS]
