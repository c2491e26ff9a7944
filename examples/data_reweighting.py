"""Meta-Weight-Net: learn per-sample loss weights from the losses, under label noise or imbalance.

A 1-100-1 weight net (sigmoid output) maps each training sample's loss to its weight in a
classifier's loss and learns, through the classifier's solution, to lower the loss on a clean
balanced meta set of 100 images (10 per class) held out of training ("Meta-Weight-Net"):

    classifier:  min_θ  Σ_i w_φ(ℓ_i) ℓ_i / Σ_i w_φ(ℓ_i),  ℓ_i = CE(f_θ(x_i), ỹ_i)   (ℓ_i read detached)
    weighting:   min_φ  CE(f_θ*(φ)(x_meta), y_meta)       through θ*(φ), by --methods

Two settings (--setting):
- noise (default): 40% of the training labels ỹ are wrong, symmetric (a uniformly random other
  class) or class-flip (class c becomes c+1), the setting of the Meta-Weight-Net paper, on 5,000
  training images (all of digits' 1,197), so that the classifier can memorize the wrong labels
  within the run. The weight net learns to down-weight high-loss samples, mostly the mislabelled.
- imbalance: clean labels, long-tailed classes (class c keeps imbalance^(-c/9) of its images),
  classified by a small CNN (`cnn`; `--model mlp` runs the noise setting's MLP instead), at ratio
  100 by default (`--levels 200 50` for others).

Arms: `baseline` trains the same classifier on the same training set with the plain mean loss;
`baseline+meta` adds the 100 clean meta images to its training set (the same data Meta-Weight-Net
sees); `class-balanced` (imbalance) weights each class's loss by the inverse of its effective
number of samples, (1 - β) / (1 - β^n_c) with β = 0.9999, the reweighting that knows the class
counts; `itd` backpropagates through the classifier's last step, the update of the paper; `aid_fd`
takes the same one-step look-ahead at the classifier's current parameters with the mixed second
derivative computed exactly (it respects the `.detach()` on the weight net's input); any other mlo
hypergrad string works too (`aid_fd_central` is `aid_fd(exact=False)`, the finite difference).

The classifier uses SGD(lr 0.1, momentum 0.9, weight decay 5e-4) with a cosine schedule in every
arm. Choices that differ from the paper, and why: the weights are normalized to mean 1 per batch,
so the weight net redistributes the classifier's step instead of shrinking it; the weight net's
Adam lr is 1e-3 under noise and 3e-4 under imbalance (the best of 1e-4 to 1e-2 on seed 0).

Test accuracy is on the clean test set (mean ± std over seeds); time is per run; memory is the
peak resident memory a run adds to the process (Linux), else the process's peak.

    PYTHONPATH=. python examples/data_reweighting.py                       # label noise
    PYTHONPATH=. python examples/data_reweighting.py --setting imbalance   # long-tailed classes
    PYTHONPATH=. python examples/data_reweighting.py --quick               # seconds (CI)

Without Fashion-MNIST (--data DIR, $MLO_FASHION_MNIST or /usr/share/datasets/fashion-mnist) it runs
on scikit-learn's digits (64 features), which is what a fresh machine without the data set sees.
"""

import argparse
import ctypes
import gc
import math
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


def cnn(features, classes, channels=8):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages (channels, 2 * channels) and a linear layer, on
    square images given as flat rows: 28x28 Fashion-MNIST average-pooled to 14x14 (a third of the
    CPU time; plain training at imbalance 100 loses 4 points), 8x8 digits as they are."""
    side = math.isqrt(features)
    pool = max(1, side // 14)
    side //= pool
    return nn.Sequential(
        nn.Unflatten(1, (1, side * pool, side * pool)), nn.AvgPool2d(pool),
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * (side // 4) ** 2, classes))


def class_balanced_weights(labels, num_classes, beta=0.9999):
    """Per-class loss weights from effective numbers, (1 - β) / (1 - β^n_c), n_c the class count."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    return ((1 - beta) / (1 - beta ** counts)).float()


NOISY_TRAIN_SIZE = 5000


def split(data, setting, level, seed):
    """Return the training set (noisy or long-tailed), a clean balanced 100-image meta set held
    out of it, and the test set. `level` is the noise kind or the imbalance ratio."""
    x, y = data["train"]
    x_meta, y_meta, rest = datasets.balanced_subset(x, y, per_class=10, seed=seed)
    x, y = x[rest], y[rest]
    if setting == "noise" and len(y) > NOISY_TRAIN_SIZE:  # Fashion-MNIST: a 5k subset, so that
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # 2000 steps
        x, y = x[keep[:NOISY_TRAIN_SIZE]], y[keep[:NOISY_TRAIN_SIZE]]  # are 40 epochs, as on digits
    if setting == "noise":
        train_set = (x, datasets.noisy_labels(y, data["num_classes"], 0.4, level, seed)[0])
    else:
        train_set = datasets.long_tailed(x, y, level, data["num_classes"], seed)
    return train_set, (x_meta, y_meta), data["test"]


def train(method, splits, seed, args):
    """Train a classifier, plain or reweighted by `method`; return test accuracy and peak MiB."""
    (x, y), meta, (x_test, y_test) = splits
    torch.manual_seed(seed)
    classes = int(y_test.max()) + 1
    net = cnn(x.shape[1], classes) if args.model == "cnn" else mlp(x.shape[1], args.hidden, classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    if method == "baseline+meta":
        x, y = torch.cat([x, meta[0]]), torch.cat([y, meta[1]])
    loader = datasets.batches(x, y, args.batch, seed)

    if method in ("baseline", "baseline+meta", "class-balanced"):
        class_weights = class_balanced_weights(y, classes) if method == "class-balanced" else None

        @mlo.level(module=net, optimizer=optimizer, data=loader, scheduler=schedule)
        def baseline(batch, module):
            inputs, labels = batch  # with class weights: Σ_i w_yi ℓ_i / Σ_i w_yi
            return F.cross_entropy(module(inputs), labels, weight=class_weights)

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
                   data=[meta], hypergrad=hypergrad(method))
        def weighting(batch, classifier):
            inputs, labels = batch
            return F.cross_entropy(classifier(inputs), labels)

        program = mlo.Program(classifier, weighting)
    _, peak = with_peak_memory(lambda: program.run(args.steps, progress=False))
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean()), peak


def hypergrad(method):
    """The `hypergrad=` of an arm: an mlo method string, or aid_fd_central (finite differences)."""
    return mlo.hypergrad.aid_fd(exact=False) if method == "aid_fd_central" else method


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


METHODS = ["baseline", "baseline+meta", "aid_fd", "itd"]
SETTINGS = {  # levels, steps, weight-net lr, classifier, methods
    "noise": (["symmetric", "flip"], 2000, 1e-3, "mlp", METHODS),
    "imbalance": ([100], 1000, 3e-4, "cnn", METHODS[:2] + ["class-balanced"] + METHODS[2:]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 level, 60 steps (CI)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="noise")
    parser.add_argument("--data", help="Fashion-MNIST folder with the four IDX files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels", nargs="+", help="noise kinds or imbalance ratios")
    parser.add_argument("--methods", nargs="+",
                        help="baseline, baseline+meta, class-balanced, or an mlo hypergrad string")
    parser.add_argument("--model", choices=["mlp", "cnn"], help="classifier (default by setting)")
    parser.add_argument("--steps", type=int, help="classifier steps (batches)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--meta-lr", type=float)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest for these small matrices on a busy CPU")
    args = parser.parse_args()
    levels, steps, meta_lr, model, methods = SETTINGS[args.setting]
    args.levels = [type(levels[0])(v) for v in args.levels] if args.levels else levels
    args.steps, args.meta_lr = args.steps or steps, args.meta_lr or meta_lr
    args.model, args.methods = args.model or model, args.methods or methods
    if args.quick:
        args.seeds, args.levels, args.steps = 1, args.levels[:1], 60
    torch.set_num_threads(args.threads)
    data = datasets.load_fashion_mnist(args.data)

    rows, column = [], "noise (40%)" if args.setting == "noise" else "imbalance"
    start_all = time.perf_counter()
    for level in args.levels:
        splits = [split(data, args.setting, level, seed) for seed in range(args.seeds)]
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
            rows.append(f"| {level} | {method} | {accuracy.mean():.2f} ± {std:.2f} | "
                        f"{seconds.mean():.1f} | {peak.max():.0f} |")
            print(rows[-1], flush=True)
    minutes = (time.perf_counter() - start_all) / 60
    print(f"\n{data['name']}, {args.setting}, {args.steps} steps of batch {args.batch}, "
          f"{args.seeds} seed(s), {minutes:.1f} minutes\n")
    print(f"| {column} | method | test accuracy (%) | time / run (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
