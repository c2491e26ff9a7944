"""Peak memory of a reweighting program with and without activation checkpointing (CPU, RSS).

    python -m benchmarks.activation_memory --depth 16 --width 512 --batch 2048 --steps 1

The lower level is a deep MLP (784 -> `width` x `depth` -> 10, ReLU) trained with SGD on random
data; the upper level a 1-100-1 weighting net (Meta-Weight-Net) learning through it with `aid_fd`,
`aid_cg` (3 iterations), `itd` (unroll 2) or `first_order` (real steps only). Each case runs in
a fresh process: it builds the program, reads its resident set size, runs `steps` upper-level steps and reports the growth of the
peak resident set size (`ru_maxrss`) over that baseline, i.e. the memory the steps needed beyond
parameters and data. RSS counts what the allocator holds, not only live tensors, so the numbers
are upper bounds of the tensors' peak. Linux only (reads /proc/self/statm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlo

from .harness import LiveBytes

METHODS = {"aid_fd": "aid_fd", "aid_cg": mlo.hypergrad.aid_cg(iters=3), "itd": "itd",
           "first_order": "first_order"}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(method: str, recompute: bool, args) -> dict:
    torch.manual_seed(0)
    widths = [784] + [args.width] * args.depth
    layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    net = nn.Sequential(*layers, nn.Linear(args.width, 10))
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    unroll = 2 if method == "itd" else 1
    data = [(torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,)))
            for _ in range(2)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01), data=data,
               unroll=unroll, activation_checkpointing=recompute)
    def classifier(batch, module, weighting):
        x, y = batch
        loss = F.cross_entropy(module(x), y, reduction="none")
        return (weighting(loss.detach()[:, None]).squeeze(1) * loss).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), data=data,
               hypergrad=METHODS[method])
    def weighting(batch, classifier):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    program = mlo.Program(classifier, weighting)
    baseline = rss_mb()
    start = time.perf_counter()
    program.run(args.steps * unroll, progress=False)
    seconds = (time.perf_counter() - start) / (args.steps * unroll)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with LiveBytes() as tracked:  # once more, counting tensors exactly (slower: not timed)
        program.run(args.steps * unroll, progress=False)
    parameters = sum(p.numel() for p in net.parameters())
    return {"method": method, "checkpointing": recompute, "peak_mb": peak - baseline,
            "tensor_mb": tracked.peak / 2 ** 20, "step_s": seconds, "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, recompute = args.case.split(":")
        print(json.dumps(measure(method, recompute == "1", args)))
        return
    print("| method | activation checkpointing | peak tensor memory (MiB) | peak RSS growth (MiB) "
          "| time per lower step (s) |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        for recompute in ("0", "1"):
            command = [sys.executable, "-m", "benchmarks.activation_memory", "--case",
                       f"{method}:{recompute}", "--depth", str(args.depth), "--width",
                       str(args.width), "--batch", str(args.batch), "--steps", str(args.steps)]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True,
                                            timeout=600).stdout.splitlines()[-1])
            print(f"| {method} | {'yes' if row['checkpointing'] else 'no'} | "
                  f"{row['tensor_mb']:.0f} | {row['peak_mb']:.0f} | {row['step_s']:.2f} |",
                  flush=True)
    print(f"\nlower level: {row['parameters'] / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
