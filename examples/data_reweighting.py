"""Meta-Weight-Net on long-tailed Fashion-MNIST: learn each sample's loss weight from its loss.

An MLP classifier trains on a long-tailed subset of Fashion-MNIST (class c keeps a fraction
imbalance^(-c/9) of its images, data.long_tailed). A 1-100-1 weight net (sigmoid output) maps each
sample's loss to its weight in the classifier's loss and learns, through the classifier's solution,
to lower the loss on a balanced meta set of 100 images (10 per class) held out of training
("Meta-Weight-Net"):

    classifier:  min_θ  Σ_i w_φ(ℓ_i) ℓ_i / Σ_i w_φ(ℓ_i),  ℓ_i = CE(f_θ(x_i), y_i)
    weighting:   min_φ  CE(f_θ*(φ)(x_meta), y_meta)       through θ*(φ), by --methods

`itd` backpropagates through the classifier's last step, which is the update of the paper;
`aid_fd` takes the same one-step look-ahead at the classifier's current parameters, with the
mixed second derivative computed exactly (it respects the `.detach()` on the weight net's input).

The classifier uses SGD(lr 0.1, momentum 0.9, weight decay 5e-4) with a cosine schedule; the
baseline trains the same classifier with the same optimizer, schedule and steps on the plain mean
loss. Choices that differ from the paper, and why: the weights are normalized to mean 1 per batch,
so the weight net redistributes the classifier's step instead of shrinking it (unnormalized weights
fell to ~0.05 on average, which weakened training and made weight decay dominate); and the weight
net's Adam uses lr 1e-4, not 1e-3, which saturated the sigmoid (weights 1e-4 .. 1) within a few
hundred steps and cost 1 to 5 points of accuracy.

Test accuracy is on the balanced 10k test set (mean ± std over seeds); time is per run; memory is
the peak resident memory a run adds to the process (Linux), else the process's peak.

    PYTHONPATH=. python examples/data_reweighting.py          # about 7 minutes on a 2-core CPU
    PYTHONPATH=. python examples/data_reweighting.py --quick  # about 10 seconds (CI)

Without Fashion-MNIST (--data DIR, $MLO_FASHION_MNIST or /usr/share/datasets/fashion-mnist) it runs
on scikit-learn's digits (64 features; at imbalance 200 the tail class then keeps no image).
"""

import argparse
import ctypes
import gc
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

import data as datasets
import mlo


def mlp(*widths):
    layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])


def split(data, imbalance, seed):
    """Return a long-tailed training set, a balanced 100-image meta set held out of it, and test."""
    x, y = data["train"]
    x_meta, y_meta, rest = datasets.balanced_subset(x, y, per_class=10, seed=seed)
    return datasets.long_tailed(x[rest], y[rest], imbalance, data["num_classes"], seed), \
        (x_meta, y_meta), data["test"]


def train(method, splits, seed, args):
    """Train a classifier, plain or reweighted by `method`; return test accuracy and peak MiB."""
    (x, y), meta, (x_test, y_test) = splits
    torch.manual_seed(seed)
    net = mlp(x.shape[1], args.hidden, int(y_test.max()) + 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    loader = datasets.batches(x, y, args.batch, seed)

    if method == "baseline":
        @mlo.level(module=net, optimizer=optimizer, data=loader, scheduler=schedule)
        def baseline(batch, module):
            inputs, labels = batch
            return F.cross_entropy(module(inputs), labels)

        program = mlo.Program(baseline)
    else:
        wnet = nn.Sequential(mlp(1, 100, 1), nn.Sigmoid())

        @mlo.level(module=net, optimizer=optimizer, data=loader, scheduler=schedule)
        def classifier(batch, module, weighting):
            inputs, labels = batch
            loss = F.cross_entropy(module(inputs), labels, reduction="none")
            weights = weighting(loss.detach().unsqueeze(1)).squeeze(1)
            return (weights * loss).sum() / weights.sum()

        @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=args.meta_lr),
                   data=[meta], hypergrad=method)
        def weighting(batch, classifier):
            inputs, labels = batch
            return F.cross_entropy(classifier(inputs), labels)

        program = mlo.Program(classifier, weighting)
    _, peak = with_peak_memory(lambda: program.run(args.steps, progress=False))
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean()), peak


def with_peak_memory(fn):
    """Return fn() and the peak resident memory (MiB) it added (elsewhere: the process's peak)."""
    gc.collect()
    try:  # Linux, glibc: give tensors over 128 KiB their own pages, then reset the peak (VmHWM)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed rather than adaptive
        libc.malloc_trim(0)
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        before = _status_mb("VmRSS")
    except OSError:
        return fn(), datasets.peak_rss_mb()
    return fn(), _status_mb("VmHWM") - before


def _status_mb(key):
    lines = pathlib.Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in lines if line.startswith(key)).split()[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 imbalance, 60 steps (CI)")
    parser.add_argument("--data", help="Fashion-MNIST folder with the four IDX files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--imbalance", type=int, nargs="+", default=[200, 100, 50])
    parser.add_argument("--methods", nargs="+", default=["baseline", "aid_fd", "itd"],
                        help="baseline or any mlo hypergrad string (aid_neumann, sama, ...)")
    parser.add_argument("--steps", type=int, default=1000, help="classifier steps (batches)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--meta-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest for these small matrices on a busy CPU")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.imbalance, args.steps = 1, [100], 60
    torch.set_num_threads(args.threads)
    data = datasets.load_fashion_mnist(args.data)

    rows = []
    for imbalance in args.imbalance:
        splits = [split(data, imbalance, seed) for seed in range(args.seeds)]
        if not rows:  # pay torch's one-time lazy imports before any timed run
            train(args.methods[-1], splits[0], 0, argparse.Namespace(**{**vars(args), "steps": 1}))
        for method in args.methods:
            runs = []
            for seed in range(args.seeds):
                start = time.perf_counter()
                accuracy, peak = train(method, splits[seed], seed, args)
                runs.append((100 * accuracy, time.perf_counter() - start, peak))
            accuracy, seconds, peak = torch.tensor(runs).T
            std = float(accuracy.std()) if args.seeds > 1 else 0.0
            rows.append(f"| {imbalance} | {method} | {accuracy.mean():.2f} ± {std:.2f} | "
                        f"{seconds.mean():.1f} | {peak.max():.0f} |")
            print(rows[-1], flush=True)
    print(f"\n{data['name']}, {args.steps} steps of batch {args.batch}, {args.seeds} seed(s)\n")
    print("| imbalance | method | test accuracy (%) | time / run (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
