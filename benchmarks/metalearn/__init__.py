"""Program 5: MAML on few-shot sinusoid regression (meta-batches 4 and 25); see common.py."""

from __future__ import annotations

from ..harness import Case, replace
from .common import Config

TITLE = "MAML, few-shot sinusoid regression"
IMPLEMENTATIONS = ("handwritten", "mlo_impl", "higher_impl", "torchopt_impl", "handwritten_vmap",
                   "mlo_vmap_impl")
NOTES = [
    "Task: y = A sin(x + b), A ~ U[0.1, 5], b ~ U[0, π], 10 support / 10 query points; MLP "
    "1-40-40-1 (ReLU); 5 inner SGD steps (lr 0.01) from θ₀ = φ; Adam (lr 1e-3) on the mean "
    "query loss of the meta-batch, second order through the inner steps. One outer step = one "
    "meta-batch of T tasks.",
    "mlo: `adapt(batch, module, meta: mlo.Init)` with unroll=5 and `meta(batch, adapt)` with "
    "hypergrad='itd', tasks=T. The learner's real steps record the second-order graph (a live "
    "unroll, mlo/live.py), so each inner step is taken once, as in the other implementations; "
    "the difference is per-step bookkeeping (schedule, window records, writing θ_t back into "
    "the learner's module and optimizer), which a network this small makes visible.",
    "Δ hypergrad: one meta step from the initial parameters; the gradient the meta optimizer "
    "applies against the hand-written one. The float64 case measures agreement at double "
    "precision (tests/test_meta.py checks MAML, FOMAML, iMAML and Meta-SGD against hand-written "
    "float64 references to 1e-8).",
]


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("quick: meta-batch 4, float32", "itd", Config(tasks=4, batches=2),
                     warmup=1, reps=3)]
    return [Case("meta-batch 4, float32", "itd", Config(tasks=4), warmup=2, reps=15),
            Case("meta-batch 25, float32", "itd", Config(tasks=25), warmup=1, reps=8),
            Case("meta-batch 4, float64", "itd", replace(Config(tasks=4), dtype="float64"),
                 warmup=1, reps=5)]
