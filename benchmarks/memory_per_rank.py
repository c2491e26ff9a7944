"""Peak memory per rank and step time of a reweighting program with a large lower level: one
process against two data-parallel ranks, with and without activation checkpointing, and two ranks
with the lower level sharded (`shard=True`, FSDP2) (CPU, gloo).

    python -m benchmarks.memory_per_rank --width 1024 --depth 19 --batch 512 --steps 3

The lower level is an MLP 784 -> `width` x `depth` -> 10 (ReLU; 19,706,890 parameters at the
default size, an `nn.Sequential` of 39 children) trained with plain SGD; the upper level a 1-100-1
weighting net (Meta-Weight-Net) with Adam, learning through it with `aid_fd`, `aid_cg` (3
iterations) or `itd` (unroll 2). Data are random. `--batch` is the global batch of either level:
one rank takes all of it, two ranks half each (their own random halves, since iterable data is not
sharded), and every rank runs what mlo runs under a process group: its bucketed `GradientReducer`
for real steps, averaged vectors in the hypergradient. Each configuration runs in a fresh process
(two forked ranks for two, gloo, file rendezvous), with one torch thread per rank. Per rank, after
one warm-up outer step (`unroll` lower steps and one upper step): the median wall time of `--steps`
outer steps (ranks meet at a barrier before each), then one more outer step measured twice at once:
the peak bytes of tensor storages alive together during it (`harness.LiveBytes`, exact) and the
peak resident set size above the one at its start (`harness.PeakMemory`; it also counts allocator
caches and, under two ranks, gloo's buffers). "Held at step start" is the bytes of both levels'
parameters, gradients and optimizer state on the rank when that step starts (for a sharded level
its shards); they count as alive until freed (a gradient set to None and made again by the step
counts once), data and anything else alive before the step not at all. "Peak tensor memory" is
the peak above what is held, so held + peak is the rank's peak of those tensors. FSDP2 gathers a unit's parameters into
storage it resizes in place, which the tensor count does not see (one or two of the 20 layers at
a time, 4 MiB each here); the RSS columns do. `--checkpointing no` leaves out the activation
checkpointing rows, `--no-shard` the sharded ones.

`--device cuda` is the device script for GPUs: the same cases with nccl, rank r on cuda:r (two
GPUs for the two-rank rows), tensor memory then being the CUDA allocator's peak above the bytes
allocated at the step's start; results go to `memory_per_rank_cuda.md`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mlo

from .harness import LiveBytes, PeakMemory, machine

METHODS = {"aid_fd": "aid_fd", "aid_cg": mlo.hypergrad.aid_cg(iters=3), "itd": "itd"}
LABELS = {"aid_fd": "aid_fd", "aid_cg": "aid_cg (3 iterations)", "itd": "itd (unroll 2)"}
OUT = os.path.join(os.path.dirname(__file__), "results", "memory_per_rank.md")


def build(method: str, recompute: bool, batch: int, seed: int, args,
          sharded: bool = False) -> mlo.Program:
    """The program one rank runs, with its own `batch` examples per level and step."""
    mlo.registry.clear()
    torch.manual_seed(0)  # equal initial parameters on every rank (rank 0's are broadcast too)
    widths = [784] + [args.width] * args.depth
    layers = [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]
    device = _device(args)
    net = nn.Sequential(*layers, nn.Linear(args.width, 10)).to(device)
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid()).to(device)
    g = torch.Generator().manual_seed(seed)

    def batches():
        return [(torch.randn(batch, 784, generator=g).to(device),
                 torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(2)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01), data=batches(),
               unroll=2 if method == "itd" else 1, activation_checkpointing=recompute,
               shard=sharded)
    def classifier(batch, module, weighting):
        x, y = batch
        loss = F.cross_entropy(module(x), y, reduction="none")
        return (weighting(loss.detach()[:, None]).squeeze(1) * loss).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3),
               data=batches(), hypergrad=METHODS[method])
    def weighting(batch, classifier):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    return mlo.Program(classifier, weighting)


def measure(method: str, recompute: bool, ranks: int, args, sharded: bool = False) -> dict:
    """Warm up, time `args.steps` outer steps, then measure memory on one more (this rank)."""
    seed = 1 + mlo.distributed.rank()  # each rank its own random half of the global batch
    program = build(method, recompute, args.batch // ranks, seed, args, sharded)
    unroll = program.levels["classifier"].options.unroll

    def outer_step():
        if ranks > 1:
            dist.barrier()
        for _ in range(unroll):
            program.step()

    outer_step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        outer_step()
        times.append(time.perf_counter() - start)
    storages = held_storages(program)
    held = sum(storage.nbytes() for storage in storages)
    rss = PeakMemory("cpu")
    rss.start()
    base = rss.base
    if args.device == "cuda":  # the allocator's peak above what the step starts with
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        outer_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        with LiveBytes(held=storages) as tensors:  # what is held counts until it is freed
            outer_step()
        peak = tensors.peak - held
    return {"tensor_mb": peak / 2 ** 20, "rss_mb": rss.stop(), "base_mb": base / 2 ** 20,
            "step_s": statistics.median(times), "held_mb": held / 2 ** 20,
            "parameters": sum(_local(p).numel()
                              for p in program.levels["classifier"].module.parameters())}


def _device(args) -> torch.device:
    if args.device == "cuda":
        return torch.device("cuda", mlo.distributed.rank() if dist.is_initialized() else 0)
    return torch.device("cpu")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def held_storages(program: mlo.Program) -> list:
    """The storages of the levels' parameters, gradients and optimizer state on this rank."""
    tensors = []
    for level in program.levels.values():
        for p in level.module.parameters():
            tensors += [p] + ([p.grad] if p.grad is not None else [])
        tensors += [v for state in level.optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        storages[storage.data_ptr()] = storage
    return list(storages.values())


def rank_main(rank: int, folder: str, case: tuple, args) -> None:
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            init_method=f"file://{folder}/init", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    method, recompute, sharded = case
    result = measure(method, recompute, ranks=2, args=args, sharded=sharded)
    dist.destroy_process_group()
    with open(os.path.join(folder, f"{rank}.json"), "w") as f:
        json.dump(result, f)


def run_case(method: str, recompute: bool, ranks: int, args, sharded: bool = False) -> list[dict]:
    """Measure one configuration in this (fresh) process, forking two ranks for `ranks=2`."""
    if ranks == 1:
        torch.set_num_threads(1)
        return [measure(method, recompute, 1, args)]
    folder = tempfile.mkdtemp()
    context = mp.get_context("spawn" if args.device == "cuda" else "fork")  # CUDA: no fork
    processes = [context.Process(target=rank_main, args=(r, folder, (method, recompute, sharded),
                                                         args))
                 for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(1200)
    if any(p.exitcode != 0 for p in processes):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in processes]}")
    results = []
    for r in range(2):
        with open(os.path.join(folder, f"{r}.json")) as f:
            results.append(json.load(f))
    shutil.rmtree(folder)
    return results


def cell(results: list[dict], key: str, fmt: str) -> str:
    return " / ".join(format(r[key], fmt) for r in results)


def row(method: str, recompute: bool, ranks: int, results: list[dict], batch: int,
        sharded: bool = False) -> str:
    for r in results:
        r["total_mb"] = r["held_mb"] + r["tensor_mb"]
    parallel = "FSDP2 (shard=True)" if sharded else "DDP-style" if ranks > 1 else "-"
    return (f"| {LABELS[method]} | {ranks} | {parallel} | {batch // ranks} | "
            f"{'yes' if recompute else 'no'} | {cell(results, 'parameters', ',')} | "
            f"{cell(results, 'held_mb', '.0f')} | {cell(results, 'tensor_mb', '.0f')} | "
            f"{cell(results, 'total_mb', '.0f')} | "
            f"{cell(results, 'rss_mb', '.0f')} | {cell(results, 'base_mb', '.0f')} | "
            f"{cell(results, 'step_s', '.2f')} |")


HEADER = ("| method | ranks | parallelism | batch per rank | activation checkpointing "
          "| parameters per rank | held at step start (MiB) | peak tensor memory (MiB) "
          "| held + peak (MiB) | peak RSS growth (MiB) | RSS at step start (MiB) "
          "| median outer step (s) |\n|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=19, help="hidden layers")
    parser.add_argument("--batch", type=int, default=512, help="global batch, split over ranks")
    parser.add_argument("--steps", type=int, default=3, help="timed outer steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=OUT, help="markdown file to write ('-': none)")
    parser.add_argument("--checkpointing", choices=["both", "no"], default="both",
                        help="activation checkpointing rows: with and without, or without only")
    parser.add_argument("--no-shard", action="store_true", help="leave out the sharded rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: nccl, one GPU per rank (the device script)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and args.out == OUT:
        args.out = OUT.replace(".md", "_cuda.md")
    if args.device == "cuda" and torch.cuda.device_count() < 2 and not args.case:
        sys.exit(f"--device cuda runs two ranks on two GPUs; this machine has "
                 f"{torch.cuda.device_count()}.")
    if args.case:
        method, recompute, ranks, sharded = args.case.split(":")
        print(json.dumps(run_case(method, recompute == "1", int(ranks), args, sharded == "1")))
        return
    torch.set_num_threads(1)
    info = machine(args.device)
    started = time.perf_counter()
    lines = [HEADER]
    print(HEADER, flush=True)
    configurations = [(1, False), (2, False)] + ([] if args.no_shard else [(2, True)])
    for method in args.methods:
        for ranks, sharded in configurations:
            for recompute in (False, True) if args.checkpointing == "both" and not sharded \
                    else (False,):
                command = [sys.executable, "-m", "benchmarks.memory_per_rank", "--case",
                           f"{method}:{int(recompute)}:{ranks}:{int(sharded)}",
                           "--width", str(args.width),
                           "--depth", str(args.depth), "--batch", str(args.batch),
                           "--steps", str(args.steps), "--device", args.device]
                out = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                                     check=False)
                if out.returncode:
                    sys.exit(f"{' '.join(command)} failed:\n{out.stderr}")
                lines.append(row(method, recompute, ranks, json.loads(out.stdout.splitlines()[-1]),
                                 args.batch, sharded))
                print(lines[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{minutes:.1f} minutes")
    if args.out != "-":
        write(args, info, lines, minutes)


def write(args, info: dict, lines: list[str], minutes: float) -> None:
    command = (f"python -m benchmarks.memory_per_rank --width {args.width} --depth {args.depth} "
               f"--batch {args.batch} --steps {args.steps}")
    if args.methods != list(METHODS):
        command += " --methods " + " ".join(args.methods)
    if args.checkpointing != "both":
        command += f" --checkpointing {args.checkpointing}"
    if args.no_shard:
        command += " --no-shard"
    if args.device == "cuda":
        command += " --device cuda"
    keys = ("cpu", "gpu", "cores", "torch threads", "python", "torch", "memory",
            "load average at start")
    where = "CUDA, nccl" if args.device == "cuda" else "CPU, gloo"
    text = [
        "# Peak memory per rank: data parallelism, sharding (FSDP2) and activation checkpointing "
        f"({where})", "",
        f"    {command}", "",
        "Machine: " + ", ".join(f"{k} {info[k]}" for k in keys if k in info) + ".", "",
        (f"Lower level: MLP 784 -> {args.width} x {args.depth} -> 10, ReLU, plain SGD. Upper "
         f"level: 1-100-1 weighting net, Adam. Global batch {args.batch} per level and step, "
         f"split over the ranks. Two-rank cells give rank 0 / rank 1. Whole run: {minutes:.1f} "
         f"minutes."), "",
        *lines, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    main()
