"""Step time of a 2-rank reweighting program: bucketed reduction during backward against one flat
all-reduce after it (gloo on CPU).

    python -m benchmarks.ddp --steps 20 --batch 128 --threads 1 [--bucket-mb 25]

Each of 2 forked ranks trains a Meta-Weight-Net program (lower level an MLP 784-1024-1024-10, about
1.9M parameters; upper level a 1-100-1 weighting net, `aid_fd`) on random data, first with
`GradientReducer` (the default under a process group), then with the program's reducers removed,
which makes it average each level's gradient after its backward pass (`mlo.distributed.average`:
here one all-reduce, the gradients being one bucket; the behaviour before the reducer). Prints a markdown table of the median step time per rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mlo


def program(batch: int, seed: int):
    mlo.registry.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 10))
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    g = torch.Generator().manual_seed(seed)

    def data():
        while True:
            yield torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
               data=data())
    def classifier(batch, module, weighting):
        x, y = batch
        loss = F.cross_entropy(module(x), y, reduction="none")
        return (weighting(loss.detach()[:, None]).squeeze(1) * loss).mean()

    @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), data=data(),
               hypergrad="aid_fd")
    def weighting(batch, classifier):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    return mlo.Program(classifier, weighting)


def rank_main(rank: int, init: str, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    mlo.distributed.BUCKET_MB = args.bucket_mb
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    times = {}
    for mode in ("bucketed", "flat") * args.repeats:
        prog = program(args.batch, seed=rank)
        if mode == "flat":
            prog._reducers.clear()
        for _ in range(3):  # warm-up
            prog.step()
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            prog.step()
            times.setdefault(mode, []).append(time.perf_counter() - start)
    torch.save(times, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--bucket-mb", type=float, default=mlo.distributed.BUCKET_MB)
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the two modes")
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    context = mp.get_context("fork")
    processes = [context.Process(target=rank_main, args=(r, os.path.join(folder, "init"), args,
                                                         os.path.join(folder, f"{r}.pt")))
                 for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(600)
    times = torch.load(os.path.join(folder, "0.pt"))
    print(f"| reduction | median step (ms) | min step (ms) | steps |\n|---|---|---|---|")
    for mode, values in times.items():
        print(f"| {mode} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f} | "
              f"{len(values)} |")


if __name__ == "__main__":
    main()
