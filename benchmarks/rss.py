"""Does memory stay flat over long runs? `python -m benchmarks.rss [--steps N]`

Runs a small bilevel program (per-feature weight decay of a linear regression, d = 10, batches
of 32, the inner cost also returning a metric) for N outer steps with each method, each in a
fresh process, and samples the resident set size every 500 steps (after `malloc_trim`, so that
memory the allocator holds but does not use is not counted). Slopes are least-squares fits in MB
per 1,000 steps: after step 2,000, and after step 10,000, where each level's history has reached
its bound (`mlo.history.LIMIT` entries). A last row keeps the history as a list of dicts per step
(the unbounded layout) to show what the bound saves.
Writes benchmarks/results/rss.md and the samples to rss.csv. Linux only (reads /proc/self/statm).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import platform
import subprocess
import sys

import torch
from torch import nn

import mlo
from mlo.history import LIMIT

METHODS = ["itd", "aid_cg", "aid_neumann", "aid_fd", "sama", "first_order"]
SAMPLE, SKIP, BOUND = 500, 2_000, 10_000


def build(method: str) -> mlo.Program:
    torch.manual_seed(0)
    x, noise = torch.randn(640, 10), torch.randn(640, 1)
    y = x @ torch.linspace(-1, 1, 10)[:, None] + 0.1 * noise
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 320, 32)]
    val = [(x[i:i + 32], y[i:i + 32]) for i in range(320, 640, 32)]
    net, decay = nn.Linear(10, 1), nn.Parameter(torch.zeros(10))

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), data=train)
    def inner(batch, module, outer):
        inputs, targets = batch
        error = module(inputs) - targets
        penalty = (outer().exp() * module.params["weight"][0] ** 2).sum() * 1e-2
        return {"loss": (error ** 2).mean() + penalty, "max_error": error.abs().max()}

    @mlo.level(module=decay, optimizer=torch.optim.Adam([decay], lr=1e-3), data=val,
               hypergrad=method)
    def outer(batch, inner):
        inputs, targets = batch
        return ((inner(inputs) - targets) ** 2).mean()

    return mlo.Program(inner, outer)


try:
    LIBC = ctypes.CDLL("libc.so.6")  # loaded once: each CDLL object is itself an allocation
except OSError:
    LIBC = None


def rss_mb() -> float:
    if LIBC is not None:
        LIBC.malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(method: str, steps: int, unbounded: bool) -> dict:
    torch.set_num_threads(1)
    program = build(method)
    if unbounded:
        program.history = {name: [] for name in program.levels}
    samples = []
    for step in range(1, steps + 1):
        program.step()
        if step % SAMPLE == 0:
            samples.append((step, rss_mb()))
    held = sum(len(h) for h in program.history.values())
    return {"samples": samples, "held": held}


def slope(samples: list, after: int) -> float:
    """Least-squares slope of RSS over the steps after `after`, in MB per 1,000 steps."""
    points = [(s, r) for s, r in samples if s > after]
    mean_s = sum(s for s, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    num = sum((s - mean_s) * (r - mean_r) for s, r in points)
    return 1000 * num / sum((s - mean_s) ** 2 for s, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--unbounded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.unbounded)))
        return
    rows, table = [], ["method,step,rss_mb"]
    for method, unbounded in [(m, False) for m in METHODS] + [("aid_fd", True)]:
        command = [sys.executable, "-m", "benchmarks.rss", "--one", method,
                   "--steps", str(args.steps)] + (["--unbounded"] if unbounded else [])
        result = json.loads(subprocess.run(command, check=True, capture_output=True,
                                           text=True).stdout)
        samples = result["samples"]
        label = method + (" (history as lists of dicts)" if unbounded else "")
        rows.append(f"| {label} | {samples[0][1]:.1f} | {samples[-1][1]:.1f} | "
                    f"{slope(samples, SKIP):+.4f} | {slope(samples, BOUND):+.4f} | "
                    f"{result['held']} |")
        table += [f"{label},{step},{rss:.3f}" for step, rss in samples]
        print(rows[-1], flush=True)
    write(args.steps, rows)
    (pathlib.Path(__file__).parent / "results" / "rss.csv").write_text("\n".join(table) + "\n")


def write(steps: int, rows: list) -> None:
    out = pathlib.Path(__file__).parent / "results" / "rss.md"
    command = "python -m benchmarks.rss" + ("" if steps == 20_000 else f" --steps {steps}")
    out.write_text("\n".join([
        "# Resident memory over long runs",
        "",
        f"Command: `{command}`; machine: {platform.machine()}, {os.cpu_count()} cores (shared "
        f"with other jobs), Python {platform.python_version()}, torch {torch.__version__}, "
        f"1 thread. Each method runs in a fresh process; RSS sampled every {SAMPLE} steps after "
        f"malloc_trim (samples in rss.csv). RSS moves in 4 KB pages (0.004 MB); each level's "
        f"history holds between {3 * LIMIT // 4:,} and {LIMIT:,} entries once bounded, hence "
        f"the sawtooth in the samples.",
        "",
        f"| method | RSS at step {SAMPLE} (MB) | RSS at step {steps:,} (MB) | slope after step "
        f"{SKIP:,} (MB per 1,000 steps) | slope after step {BOUND:,} | history entries held |",
        "|---|---:|---:|---:|---:|---:|",
        *rows, ""]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
