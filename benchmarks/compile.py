"""Does `torch.compile` help mlo's steps? `python -m benchmarks.compile [--steps N] [--device cuda]
[--mode reduce-overhead]`

Builds the reweighting program (MLP 784-256-10, weight net 1-100-1, batch 128) twice, once eager
and once with `@mlo.level(compile=...)` on both levels (real steps compiled, hypergradient passes
eager: compiled graphs do not support their double backward), and times global steps alternately
after warm-up, per method. `--mode reduce-overhead` asks torch.compile for CUDA graphs (GPU).
Writes benchmarks/results/compile[_<device>].md. This is the device script for a GPU:
`python -m benchmarks.compile --device cuda` and again with `--mode reduce-overhead`.
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


def build(compiled: bool, method: str, device: str = "cpu", mode: str | None = None) -> mlo.Program:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid()).to(device)
    option = ({"mode": mode} if mode else True) if compiled else False
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(128, 784, generator=g).to(device),
             torch.randint(0, 10, (128,), generator=g).to(device)) for _ in range(10)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=data,
               name="compile_classifier", compile=option)
    def classifier(batch, module, compile_weighting):
        x, y = batch
        loss = F.cross_entropy(module(x), y, reduction="none")
        return (compile_weighting(loss.detach()[:, None]).squeeze(1) * loss).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), data=data,
               hypergrad=build_method(method), name="compile_weighting", compile=option)
    def weighting(batch, compile_classifier):
        x, y = batch
        return F.cross_entropy(compile_classifier(x), y)

    return mlo.Program(classifier, weighting)


def measure(method: str, steps: int, device: str = "cpu", mode: str | None = None) -> list[str]:
    programs, rows = {}, []
    for compiled in (False, True):
        start = time.perf_counter()
        try:
            programs[compiled] = build(compiled, method, device, mode)
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
            _sync(device)
            start = time.perf_counter()
            program.step()
            _sync(device)
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
    parser.add_argument("--methods", nargs="+",
                        default=["aid_fd_central", "aid_fd", "aid_cg", "itd"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    command = f"python -m benchmarks.compile --steps {args.steps} --device {args.device}" + \
        (f" --mode {args.mode}" if args.mode else "")
    lines = ["# @mlo.level(compile=...): real steps compiled by torch.compile\n",
             f"Command: `{command}`; machine: {where}, torch {torch.__version__}, 1 CPU thread.\n",
             "| method | modules | ms per global step (median) | build + 5 warm-up steps (s) | note |",
             "|---|---|---:|---:|---|"]
    for method in args.methods:
        lines += measure(method, args.steps, args.device, args.mode)
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0] + \
        (f"_{args.mode}" if args.mode else "")
    path = pathlib.Path(__file__).parent / "results" / f"compile{suffix}.md"
    path.write_text(text)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
