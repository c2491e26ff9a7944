"""Where one outer step's time goes: matrix products per method, from torch.profiler.

    python -m benchmarks.profile_step [--hidden 1024 1024] [--steps 12]

Builds the reweighting program (unroll 1) once per implementation (`--impls`, default mlo_impl)
and method (`--methods`, default aid_fd aid_fd_central), takes two warm-up outer
steps, profiles `--steps` more on one thread, and lists the self CPU time of every matrix product
(`aten::mm`, `aten::addmm`) grouped by operand shapes, with calls per step. Each program is
profiled on its own (not interleaved), so compare call counts more than milliseconds on a busy
machine. Writes benchmarks/results/reweight_profile.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from . import harness
from .reweight import common

PRODUCTS = ("aten::mm", "aten::addmm")


def products(impl: str, method: str, hidden: tuple, steps: int) -> tuple[str, list[str]]:
    """(a summary line, table rows of the matrix products) for one implementation and method."""
    module, why = harness.load("reweight", impl)
    if module is None:
        return f"- {impl}, {method}: unavailable ({why})", []
    runner = module.make(common.Config(method=method, hidden=hidden))
    for _ in range(2):
        runner.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            runner.step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    matmuls = [e for e in sorted(events, key=lambda e: -e.self_cpu_time_total)
               if e.key in PRODUCTS]
    large = [e for e in matmuls if _multiply_adds(e.input_shapes) >= 1e7]
    large_ms = sum(e.self_cpu_time_total for e in large) / 1e3 / steps
    summary = (f"- {impl}, {method}: {total:.1f} ms self CPU per outer step (all operators, under "
               f"the profiler); {sum(e.count for e in large) / steps:.0f} matrix products of "
               f"10⁷ multiply-adds or more per step, {large_ms:.1f} ms")
    rows = [f"| {impl} | {method} | `{e.key}` | {e.input_shapes} | {e.count / steps:.0f} | "
            f"{e.self_cpu_time_total / 1e3 / steps:.1f} |" for e in matmuls]
    return summary, rows


def _multiply_adds(shapes) -> int:
    a, b = [shape for shape in shapes if len(shape) == 2][:2]  # mm: (A, B); addmm: (bias, A, B)
    return a[0] * a[1] * b[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=["aid_fd", "aid_fd_central"])
    parser.add_argument("--impls", nargs="+", default=["mlo_impl"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = harness.machine()
    hidden = tuple(args.hidden)
    command = " ".join(["python -m benchmarks.profile_step",
                        *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Matrix products of one reweighting outer step, MLP 784-"
             f"{'-'.join(map(str, hidden))}-10, unroll 1", "", f"Command: `{command}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    table = ["| implementation | method | operator | operand shapes | calls per step | "
             "self CPU ms per step |", "|---|---|---|---|---:|---:|"]
    for impl in args.impls:
        for method in args.methods:
            summary, rows = products(impl, method, hidden, args.steps)
            lines.append(summary)
            table += rows
    text = "\n".join(lines + [""] + table) + "\n"
    print(text)
    path = pathlib.Path(__file__).parent / "results" / "reweight_profile.md"
    path.write_text(text)


if __name__ == "__main__":
    main()
