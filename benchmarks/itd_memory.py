"""Peak memory and time of `itd` against `itd(recompute=True)` (keeping every step's starting
point, and every k-th with k = round(√unroll)) on the reweighting program.

    python -m benchmarks.itd_memory --unrolls 5 20 100 --threads 1

For each unroll the two methods run interleaved in one process (the harness of `python -m
benchmarks`: warm-up, rotated order, median time, then the peak memory of further steps: RSS
high-water mark above the step's start on CPU, the allocator's peak on CUDA), mlo only; then
one more outer step of each counts the bytes of live tensors exactly (`LiveBytes`: no allocator
cache or fragmentation; parameters and data allocated before the step are not counted). `itd`
records each classifier step's double-backward graph during the real steps and holds the
window's graph until the weight net's step; `itd(recompute=True)` keeps each step's parameters
and rebuilds one step's graph at a time in the reverse pass. Both compute the same
hypergradient (tests/test_itd_recompute.py). Results go to benchmarks/results/itd_memory.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import report
from .harness import Case, LiveBytes, load, machine, measure
from .reweight import common

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unrolls", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(args.device)
    import benchmarks.reweight as program
    name = "mlp 784-" + "-".join(map(str, args.hidden)) + "-10"
    lines, rows_all = [], []
    for unroll in args.unrolls:
        every = max(2, round(unroll ** 0.5))
        methods = ("itd", "itd_recompute", f"itd_recompute_{every}")
        cases = [Case(f"{name}, {m}, unroll {unroll}", m,
                      common.Config(method=m, unroll=unroll, hidden=tuple(args.hidden),
                                    batch=args.batch, device=args.device),
                      warmup=1, reps=args.reps) for m in methods]
        rows = measure(program, "reweight", cases, ["mlo_impl"], check=False)
        rows_all += rows
        tensors = [_tensor_peak_mb(case.config) for case in cases]
        whole = rows[0]
        for row, tensor, label in zip(rows, tensors, ("itd", "recompute", f"recompute, every {every}")):
            lines.append(f"| {unroll} | {label} | {row.median:.1f} | {row.median / whole.median:.2f} "
                         f"| {tensor:.1f} | {tensors[0] / tensor:.2f} | {row.peak_mb:.1f} |")
            print(lines[-1], flush=True)
    table = ("| unroll | method | ms / outer step | time / itd | peak tensor MiB | memory: itd / "
             "this | peak RSS MiB |\n|---:|---|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    command = "python -m benchmarks.itd_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    report.write("itd_memory", f"itd against itd(recompute=True), {name}, batch {args.batch}",
                 info, command, rows_all, [], extra=table)
    print(table)
    return 0


def _tensor_peak_mb(config) -> float:
    """Peak bytes of live tensors during one outer step, after one warm-up step."""
    module, why = load("reweight", "mlo_impl")
    runner = module.make(config)
    runner.step()
    with LiveBytes() as tracked:
        runner.step()
    return tracked.peak / 2 ** 20


if __name__ == "__main__":
    raise SystemExit(main())
