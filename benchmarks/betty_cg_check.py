"""Show that Betty's `cg` differs from conjugate gradient by one line, and by nothing else.

Betty 0.2.1 (betty/hypergradient/cg.py) updates the search direction as p ← r_old + βp; textbook
CG uses the new residual, p ← r_new + βp. This replaces Betty's function with a copy that differs
only in that line and prints, for reweight and logreg, the relative difference of one outer step's
hypergradient from the hand-written CG with Betty as shipped and with the line corrected.

    python -m benchmarks.betty_cg_check
"""

from __future__ import annotations

import logging
import warnings

import torch
import betty.hypergradient as betty_hypergradient
from betty.utils import neg_with_none, to_vec

from . import harness, logreg, reweight
from .logreg import common as logreg_common
from .reweight import common as reweight_common


def corrected_cg(vector, curr, prev, sync):
    """Betty's `cg` with the direction update p ← r_new + βp (its other lines unchanged)."""
    config = curr.config
    in_loss = curr.training_step_exec(curr.cur_batch)
    in_grad = torch.autograd.grad(in_loss, curr.trainable_parameters(), create_graph=True)
    x = [torch.zeros_like(v) for v in vector]
    r = [v.clone() for v in vector]
    p = [v.clone() for v in vector]
    for _ in range(config.cg_iterations):
        hvp = torch.autograd.grad(in_grad, curr.parameters(), grad_outputs=p, retain_graph=True)
        numerator = torch.dot(to_vec(r), to_vec(r))
        alpha = numerator / torch.dot(to_vec(hvp, alpha=config.cg_alpha), to_vec(p))
        x = [a + alpha * b for a, b in zip(x, p)]
        r_new = [a - alpha * b for a, b in zip(r, hvp)]
        beta = torch.dot(to_vec(r_new), to_vec(r_new)) / numerator
        p = [a + beta * b for a, b in zip(r_new, p)]
        r = r_new
    x = [config.cg_alpha * a for a in x]
    implicit = torch.autograd.grad(in_grad, prev.trainable_parameters(), grad_outputs=x)
    implicit = [neg_with_none(g) for g in implicit]
    if sync:
        prev.set_grads(prev.trainable_parameters(), implicit)
        return None
    return implicit


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("betty").setLevel(logging.WARNING)
    shipped = betty_hypergradient.jvp_fn_mapping["cg"]
    programs = ((reweight, reweight_common.Config(method="aid_cg", hidden=(64,), batch=32)),
                (logreg, logreg_common.Config(method="aid_cg", samples=200, unroll=10)))
    for program, config in programs:
        for label, fn in (("as shipped", shipped), ("direction corrected", corrected_cg)):
            betty_hypergradient.jvp_fn_mapping["cg"] = fn
            rows = [harness.Row("check", "aid_cg", impl) for impl in ("handwritten", "betty_impl")]
            harness.agreement(program, harness.Case("check", "aid_cg", config), rows)
            print(f"{program.__name__.split('.')[-1]:9s} Betty cg {label:20s} "
                  f"relative difference from hand-written CG: {rows[1].diff_rel:.1e}")
    betty_hypergradient.jvp_fn_mapping["cg"] = shipped


if __name__ == "__main__":
    main()
