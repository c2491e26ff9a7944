"""`python -m benchmarks`: measure multilevel programs across implementations side by side.

    python -m benchmarks --quick                        # every program, small, a few seconds each
    python -m benchmarks --programs reweight logreg     # full programs 1 and 2
    python -m benchmarks --programs reweight --impls handwritten mlo_impl \
        --methods aid_fd aid_fd_central --tag aid_fd             # exact against central

Results go to benchmarks/results/<program>[_quick][_<tag>].md and .csv; where a run has both
aid_fd and aid_fd_central, a table of their time and memory ratios follows the per-case tables.
The hand-written baseline is the reference every other implementation is compared with; an
implementation whose library does not import is reported as unavailable, with the reason, and
the rest still run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings

import torch

from . import harness, report

PROGRAMS = ("reweight", "logreg", "trilevel", "scaling", "metalearn")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    parser.add_argument("--impls", nargs="+", default=None,
                        help="implementation modules to run (e.g. handwritten betty_impl "
                             "torchopt_impl higher_impl mlo_impl explicit); default: all")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to run (aid_fd aid_fd_central aid_cg aid_neumann itd); "
                             "default: all")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps")
    parser.add_argument("--reps", type=int, default=None, help="timed outer steps per case")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the one-step hypergradient agreement check")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--tag", default="",
                        help="results file suffix, so that a partial run (e.g. --methods aid_fd "
                             "aid_fd_central) does not replace a program's full tables")
    parser.add_argument("--explicit-max-d", type=int, default=None,
                        help="scaling: largest d for the explicit d×d baseline "
                             "(default 10,000; quick 1,000)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("betty").setLevel(logging.WARNING)
    info = harness.machine(args.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])

    for name in args.programs:
        program = importlib.import_module(f"benchmarks.{name}")
        started = time.perf_counter()
        print(f"\n== {program.TITLE}")
        if hasattr(program, "run"):  # a program with its own protocol (scaling)
            rows, extra = program.run(args, info, print)
        else:
            rows = run_cases(program, name, args)
            extra = report.method_ratios(rows, "aid_fd", "aid_fd_central")
        suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        md, csv = report.write(name + suffix, program.TITLE, info, command, rows,
                               program.NOTES, extra, getattr(program, "PER_CASE_TABLES", True))
        print(f"   {time.perf_counter() - started:.0f} s; wrote {os.path.relpath(md)} and "
              f"{os.path.relpath(csv)}")
    return 0


def run_cases(program, name: str, args) -> list:
    impls = [i for i in program.IMPLEMENTATIONS if args.impls is None or i in args.impls]
    rows = []
    for group in method_groups(program.cases(args.quick), args.methods):
        for case in group:
            if args.reps:
                case.reps = args.reps
            if args.device != "cpu":
                case.config = harness.replace(case.config, device=args.device)
        print("-- " + " | ".join(case.label for case in group))
        case_rows = harness.measure(program, name, group, impls, check=not args.no_check)
        for r in case_rows:
            if r.status == "ok":
                q1, q3 = r.iqr
                print(f"   {r.method:14s} {r.impl:14s} {r.median:9.2f} ms  [{q1:.2f}, {q3:.2f}]  "
                      f"peak {r.peak_mb:7.1f} MiB  loss {r.loss:.5f}  "
                      f"Δ {r.diff_abs:.1e} ({r.diff_rel:.1e} rel)")
            else:
                print(f"   {r.method:14s} {r.impl:14s} {r.status}: {r.reason}")
        rows += case_rows
    return rows


def method_groups(cases, methods=None) -> list:
    """Group cases whose configs differ only in the method, in order of first appearance, so that
    their methods are measured interleaved; drop cases whose method is not in `methods`."""
    groups: dict = {}
    for case in cases:
        if methods and case.method not in methods:
            continue
        key = harness.replace(case.config, method=None)
        groups.setdefault(key, []).append(case)
    return list(groups.values())


if __name__ == "__main__":
    sys.exit(main())
