"""Does `torch.compile` help mlo's hypergradient steps? `python -m benchmarks.compile [--steps N]`

Builds the reweighting program (MLP 784-256-10, weight net 1-100-1, batch 128) twice, once with
eager modules and once with `torch.compile`d modules, and times global steps alternately after
warm-up, per method. Compiled graphs run the first-order passes of `aid_fd_central` (the central
difference, `mlo.hypergrad.aid_fd(exact=False)`); the double backward of the exact `aid_fd`,
`aid_cg`, `aid_neumann` and `itd` is not supported by compiled graphs, which the table reports.
Writes benchmarks/results/compile.md.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlo

from .mlo_methods import method as build_method


def build(compiled: bool, method: str) -> mlo.Program:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    if compiled:
        net, wnet = torch.compile(net), torch.compile(wnet)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g))
            for _ in range(10)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=data,
               name="compile_classifier")
    def classifier(batch, module, compile_weighting):
        x, y = batch
        loss = F.cross_entropy(module(x), y, reduction="none")
        return (compile_weighting(loss.detach()[:, None]).squeeze(1) * loss).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), data=data,
               hypergrad=build_method(method), name="compile_weighting")
    def weighting(batch, compile_classifier):
        x, y = batch
        return F.cross_entropy(compile_classifier(x), y)

    return mlo.Program(classifier, weighting)


def measure(method: str, steps: int) -> list[str]:
    programs, rows = {}, []
    for compiled in (False, True):
        start = time.perf_counter()
        try:
            programs[compiled] = build(compiled, method)
            for _ in range(5):
                programs[compiled].step()
        except RuntimeError as error:
            programs.pop(compiled, None)
            rows.append(f"| {method} | compiled | – | – | {str(error).splitlines()[0][:90]} |")
            continue
        rows.append((compiled, time.perf_counter() - start))
    times = {c: [] for c in programs}
    for _ in range(steps):
        for compiled, program in programs.items():
            start = time.perf_counter()
            program.step()
            times[compiled].append(time.perf_counter() - start)
    out = []
    for row in rows:
        if isinstance(row, str):
            out.append(row)
            continue
        compiled, warmup = row
        label = "compiled" if compiled else "eager"
        out.append(f"| {method} | {label} | {statistics.median(times[compiled]) * 1e3:.2f} | "
                   f"{warmup:.1f} | |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["aid_fd_central", "aid_fd", "aid_cg"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["# torch.compile of the levels' modules\n",
             f"Command: `python -m benchmarks.compile --steps {args.steps}`; machine: "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread.\n",
             "| method | modules | ms per global step (median) | build + 5 warm-up steps (s) | note |",
             "|---|---|---:|---:|---|"]
    for method in args.methods:
        lines += measure(method, args.steps)
    text = "\n".join(lines) + "\n"
    print(text)
    path = pathlib.Path(__file__).parent / "results" / "compile.md"
    path.write_text(text)


if __name__ == "__main__":
    main()
