"""Peak memory and step time of fp32 vs fp16 vs bf16 on a ResNet-18 data-reweighting program.

Meta-Weight-Net shape: a `classifier` level (ResNet-18, BasicBlock [2, 2, 2, 2], widths
64-128-256-512, 3×32×32 inputs, 10 classes, BatchNorm; SGD) trains on
per-sample losses weighted by a 1-100-1 weight net; the `weighting` level (Adam) learns through
the classifier's solution with `hypergrad="aid_fd"`. Both levels run in the precision under test:
`@mlo.level()`, `@mlo.level(fp16=True)` or `@mlo.level(bf16=True)`. Data: random, fixed seed.

Protocol: in rounds A B C, A B C, ... each precision builds its program fresh from the same initial
parameters, takes `--warmup` global steps, then `--steps` timed ones (synchronized on GPU).
Reported: the median ms per global step over every timed step; peak memory (GPU:
`max_memory_allocated` after `reset_peak_memory_stats` before the build, so parameters, optimizer
state and the shared data count; CPU: the resident high-water mark of `resource.getrusage`, reset
through /proc/self/clear_refs before the build, process-wide, so the interpreter and torch count);
each level's final loss; fp16 steps the loss scaler skipped for an overflow
(`Precision.overflows`); updates skipped for a non-finite loss or hypergradient
(`on_nonfinite="skip"`, `program.skipped`).

    python -m benchmarks.precision --device cuda      # on a GPU machine: width 64, batch 128
    python -m benchmarks.precision --quick            # width 4, batch 4, CPU, about 30 s
    python -m benchmarks.precision --quick --threads 1 # steadier timings on a busy shared CPU

Results go to benchmarks/results/precision_<device>.md (`_quick` appended in quick mode).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlo

PRECISIONS = {"fp32": {}, "fp16": {"fp16": True}, "bf16": {"bf16": True}}


def norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3×3 stem, four stages of two BasicBlocks of widths w, 2w, 4w, 8w."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def make_data(count: int, batch: int, device: str, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(count)]


def build(options: dict, args, train: list, meta: list) -> mlo.Program:
    """Build the reweighting program fresh, from the same initial parameters for every precision."""
    torch.manual_seed(0)
    net = ResNet18(args.width).to(args.device)
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    wnet = wnet.to(args.device)

    @mlo.level(module=net, data=train, **options, optimizer=torch.optim.SGD(
        net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
    def classifier(batch, module, weighting):
        x, y = batch
        losses = F.cross_entropy(module(x), y, reduction="none")
        return (weighting(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), data=meta,
               hypergrad="aid_fd", **options)
    def weighting(batch, classifier):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    return mlo.Program(classifier, weighting, on_nonfinite="skip")


def reset_peak(device: str) -> None:
    mlo.registry.clear()  # it holds the last program's levels (modules, optimizer states)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap first, so the mark drops
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's RSS high-water mark, which getrusage reports
    except OSError:
        pass  # not Linux/glibc: the mark stays the process's all-time peak


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def run_round(name: str, args, train: list, meta: list, result: dict) -> None:
    """Build one precision's program, warm it up, and time `args.steps` global steps."""
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    reset_peak(args.device)
    program = build(PRECISIONS[name], args, train, meta)
    for _ in range(args.warmup):
        program.step()
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        program.step()
        sync()
        result["ms"].append((time.perf_counter() - start) * 1e3)
    result["peak"] = max(result.get("peak", 0.0), peak_mib(args.device))
    result["losses"] = {n: h[-1]["loss"] for n, h in program.history.items()}
    result["overflows"] = {n: p.overflows for n, p in program._precision.items()}
    result["skipped"] = dict(program.skipped)


def machine(device: str) -> str:
    if device == "cuda":
        hardware = f"GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or "unknown"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name")), cpu)
        hardware = f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{hardware}; python {platform.python_version()}, torch {torch.__version__}"


def table(results: dict, device: str) -> str:
    memory = "peak allocated (MiB)" if device == "cuda" else "peak RSS, process (MiB)"
    lines = [f"| precision | median ms / step | vs fp32 | {memory} | vs fp32 | classifier loss | "
             "weighting loss | scaler overflows (cls / wnet) | non-finite skips (cls / wnet) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = results["fp32"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |" + " |" * 7)
            continue
        ms, (o, s) = statistics.median(r["ms"]), (r["overflows"], r["skipped"])
        speed = f"{ms / statistics.median(base['ms']):.2f}×" if "peak" in base else "–"
        mem = f"{r['peak'] / base['peak']:.2f}×" if "peak" in base else "–"
        lines.append(f"| {name} | {ms:.1f} | {speed} | {r['peak']:.0f} | {mem} | "
                     f"{r['losses']['classifier']:.4f} | {r['losses']['weighting']:.4f} | "
                     f"{o['classifier']} / {o['weighting']} | "
                     f"{s['classifier']} / {s['weighting']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="width 4, batch 4, 3 steps")
    parser.add_argument("--steps", type=int, default=None, help="timed global steps per round")
    parser.add_argument("--batch", type=int, default=None, help="batch size of both levels")
    parser.add_argument("--warmup", type=int, default=None, help="untimed global steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of fp32 fp16 bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    args.width = 4 if args.quick else 64
    args.batch = args.batch or (4 if args.quick else 128)
    args.steps = args.steps or (3 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)

    command = "python -m benchmarks.precision " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = (f"ResNet-18 width {args.width}, batch {args.batch}, {args.warmup} warm-up + "
             f"{args.steps} timed global steps × {args.rounds} rounds (fp32 fp16 bf16 order)")
    info = machine(args.device)
    print(f"{command}\n{info}\n{setup}")
    train, meta = make_data(8, args.batch, args.device, 1), make_data(2, args.batch, args.device, 2)
    results = {name: {"ms": []} for name in PRECISIONS}
    for round_ in range(1, args.rounds + 1):
        for name, result in results.items():
            if "error" in result:
                continue
            try:
                run_round(name, args, train, meta, result)
                print(f"round {round_} {name}: median so far {statistics.median(result['ms']):.1f}"
                      f" ms, peak {result['peak']:.0f} MiB, skipped {result['skipped']}")
            except Exception as error:  # one unsupported precision must not hide the others
                result["error"] = f"error: {type(error).__name__}: {error}".replace("|", "/")
                print(f"round {round_} {name}: {result['error']}")

    md = table(results, args.device)
    print("\n" + md)
    path = os.path.join(os.path.dirname(__file__), "results",
                        f"precision_{args.device}{'_quick' if args.quick else ''}.md")
    with open(path, "w") as f:
        f.write(f"# Mixed precision on ResNet-18 data reweighting (aid_fd)\n\n"
                f"Command: `{command}`\n\nMachine: {info}\n\n{setup}. Median over all timed "
                f"steps; peak: max over rounds; overflows, skips and losses: the last round's "
                f"{args.warmup + args.steps} steps.\n\n{md}\n")
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
