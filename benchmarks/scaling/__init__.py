"""Program 4: time and memory of one hypergradient against the parameter count d.

Each method computes (dw*/dλ)ᵀ v once for weight-decay logistic regression with d weights and d
hyperparameters (see common.py), for d from 1e3 to 1e6; the explicit-matrix baseline runs only
while its d×d matrices fit. Log-log slopes of time and memory against d summarise the scaling
(1 = linear). Implementations alternate within each (d, method) after a warm-up call.
"""

from __future__ import annotations

import gc
import math
import statistics
import time


from .. import harness
from ..harness import Row
from . import common

TITLE = "Scaling of one hypergradient with the parameter count d"
IMPLEMENTATIONS = ("handwritten", "mlo_impl", "explicit")
METHODS = ("aid_cg", "aid_neumann", "aid_fd", "aid_fd_central", "itd", "explicit")
PER_CASE_TABLES = False
NOTES = [
    "Problem: f(w, λ) = mean BCE(Xw, y) + ½ Σ exp(λ_j) w_j², X ∈ R^{64×d}, λ ∈ R^d, "
    "v = ∇_w of the validation loss; one hypergradient (dw*/dλ)ᵀ v per call, at fixed (w, λ).",
    "aid_cg / aid_neumann: 10 iterations (Neumann α = 0.1); aid_fd: exact −ξ ∂²f/∂λ∂w · v, "
    "ξ = 0.1 (hand-written: the closed form −ξ exp(λ) ⊙ w ⊙ v); aid_fd_central: its central "
    "difference, r = 0.01; itd: 10 "
    "unrolled SGD steps (lr 0.1) from w, included in its time since they are what it "
    "differentiates; explicit: torch.func.hessian for H and torch.func.jacrev(grad) for the "
    "mixed Jacobian (both d×d), then torch.linalg.solve — run only while 3·d² floats fit the "
    "budget (--explicit-max-d, default 10,000).",
    "handwritten: torch.autograd with one retained gradient graph (aid_fd: no graph); mlo_impl: "
    "mlo's functional core (`mlo.hypergrad.<method>(...)(loss_fn, inner, outer, v, lr=0.1)`, no Program).",
    "'error vs exact' measures each method's approximation, not a defect: w is not a minimiser "
    "and the curvature is small (exp(λ) = 0.01), so 10 Neumann terms with α = 0.1, the "
    "identity Hessian (the DARTS one-step best response of aid_fd and aid_fd_central) and 10 "
    "unrolled steps are far "
    "from the implicit answer that 10 CG iterations reach.",
    "Slopes are least-squares fits of log(ms) or log(MiB) against log(d); 'slope ≥1e4' uses only "
    "d ≥ 10,000, where fixed per-call overheads no longer dominate. Memory is the peak resident "
    "memory above the level before the call (X itself, 2·64·d floats, is allocated before).",
]


def sizes(quick: bool) -> list[int]:
    if quick:
        return [1_000, 10_000]
    return [1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000]


def run(args, info, log=print):
    quick = args.quick
    impls = [i for i in IMPLEMENTATIONS if args.impls is None or i in args.impls]
    methods = [m for m in METHODS if args.methods is None or m in args.methods]
    explicit_max = getattr(args, "explicit_max_d", None) or (1_000 if quick else 10_000)
    modules = {}
    rows: list[Row] = []
    for impl in impls:
        module, why = harness.load("scaling", impl)
        modules[impl] = (module, why)
    errors = {}  # (method, impl, d) -> relative error against the explicit hypergradient
    for d in sizes(quick):
        p = common.problem(d, device=args.device)
        exact = None
        # the explicit (exact) hypergradient first, to measure the other methods' error against it
        for method in sorted(methods, key=lambda m: m != "explicit"):
            group = []
            for impl in impls:
                row = Row(f"d = {d:,}", method, impl)
                module, why = modules[impl]
                if module is None:
                    row.status, row.reason = "unavailable", why
                elif method in module.UNSUPPORTED:
                    row.status, row.reason = "unsupported", module.UNSUPPORTED[method]
                elif method == "explicit" and d > explicit_max:
                    row.status, row.reason = "skipped", f"d×d matrices over the budget (d > {explicit_max:,})"
                else:
                    group.append((row, module.hypergradient(method, p)))
                if row.status not in ("ok", "unsupported"):
                    rows.append(row)
            results = _measure(group, d, quick, args.reps, args.device)
            if method == "explicit" and results:
                exact = next(iter(results.values()))
            ref = results.get("handwritten")
            for row, _ in group:
                rows.append(row)
                out = results.get(row.impl)
                if out is not None and ref is not None:
                    scale = ref.abs().max().item()
                    row.diff_abs = (out - ref).abs().max().item()
                    row.diff_rel = row.diff_abs / scale if scale else float("nan")
                if out is not None:
                    row.loss = out.norm().item()
            for row, _ in group:
                if row.status == "ok":
                    log(f"   d={d:>9,} {method:14s} {row.impl:12s} {row.median:10.2f} ms  "
                        f"peak {row.peak_mb:8.1f} MiB  Δ {row.diff_rel:.1e} rel")
                else:
                    log(f"   d={d:>9,} {method:14s} {row.impl:12s} {row.status}: {row.reason}")
            for row, fn in group:
                if row.status == "ok" and exact is not None and method != "explicit":
                    out = fn().detach().double()
                    errors[(method, row.impl, d)] = ((out - exact).abs().max()
                                                    / exact.abs().max()).item()
            results.clear()
        del p, exact
        gc.collect()
    return rows, _markdown(rows, errors, methods, impls, quick)


def _measure(group, d, quick, reps, device):
    """Time each closure (interleaved), record peak memory; return the last result per impl."""
    memory = harness.PeakMemory(device)
    big_explicit = any(row.method == "explicit" for row, _ in group) and d >= 10_000
    warmup = 0 if big_explicit else 1
    reps = reps or (1 if big_explicit else (2 if quick else (3 if d >= 300_000 else 5)))
    results = {}
    for _ in range(warmup):
        for row, fn in group:
            _call(row, fn, results)
    for rep in range(reps + 1):  # the last round measures memory, untimed (see harness)
        for row, fn in group:
            if row.status != "ok":
                continue
            timed = rep < reps
            if not timed:
                memory.start()
            start = time.perf_counter()
            ok = _call(row, fn, results)
            harness._sync(device)
            elapsed = (time.perf_counter() - start) * 1e3
            if ok and timed:
                row.times_ms.append(elapsed)
            elif ok:
                row.mem_mb.append(memory.stop())
    return results


def _call(row, fn, results):
    try:
        results[row.impl] = fn().detach().double()
        return True
    except Exception as exc:  # e.g. out of memory: report, continue with the rest
        row.status, row.reason = "error", harness._why(exc)
        results.pop(row.impl, None)
        return False


def slope(points) -> float:
    """Least-squares slope of log(y) on log(x) over points with y > 0."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y and y > 0 and not math.isnan(y)]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")


def _markdown(rows, errors, methods, impls, quick) -> str:
    ds = sorted({int(r.case.split("=")[1].replace(",", "")) for r in rows})
    table = {(r.method, r.impl, int(r.case.split("=")[1].replace(",", ""))): r for r in rows}
    out = []
    for title, value, unit in (("Time of one hypergradient", lambda r: r.median, "ms"),
                               ("Peak memory of one hypergradient", lambda r: r.peak_mb, "MiB")):
        out += [f"## {title} ({unit}, median over calls)", ""]
        out += ["| method | implementation | " + " | ".join(f"d={d:.0e}" for d in ds)
                + " | slope (all) | slope (d ≥ 1e4) |",
                "|---|---|" + "---:|" * (len(ds) + 2)]
        for method in methods:
            for impl in impls:
                cells, pts = [], []
                for d in ds:
                    r = table.get((method, impl, d))
                    if r is None or r.status != "ok":
                        cells.append("–")
                        continue
                    val = value(r)
                    cells.append(f"{val:.1f}" if val >= 1 or unit == "ms" else f"{val:.2f}")
                    pts.append((d, val))
                if not pts:
                    continue
                s_all = slope(pts)
                s_big = slope([(d, v) for d, v in pts if d >= 10_000])
                out.append(f"| {method} | {impl} | " + " | ".join(cells)
                           + f" | {s_all:.2f} | {s_big:.2f} |".replace("nan", "–"))
        out.append("")
    out += ["## Agreement", "",
            "Largest relative difference from the hand-written implementation of the same method "
            "over all d (max |Δ| / max |hand-written|), and relative error against the explicit "
            "(exact implicit) hypergradient where that ran.", "",
            "| method | implementation | Δ vs hand-written (max over d) | "
            + " | ".join(f"error vs exact, d={d:.0e}" for d in ds
                         if any(k[2] == d for k in errors)) + " |",
            "|---|---|---:|" + "---:|" * len({k[2] for k in errors})]
    for method in methods:
        if method == "explicit":
            continue
        for impl in impls:
            diffs = [table[(method, impl, d)].diff_rel for d in ds
                     if (method, impl, d) in table and table[(method, impl, d)].status == "ok"]
            if not diffs:
                continue
            errs = [f"{errors[(method, impl, d)]:.1e}" if (method, impl, d) in errors else "–"
                    for d in ds if any(k[2] == d for k in errors)]
            worst = max(diffs)
            out.append(f"| {method} | {impl} | {worst:.1e} | " + " | ".join(errs) + " |")
    return "\n".join(out)
