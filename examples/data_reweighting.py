"""Meta-Weight-Net on long-tailed Fashion-MNIST: learn a per-sample loss weight from the loss itself.

An MLP classifier trains on a long-tailed subset of Fashion-MNIST (class c keeps a fraction
imbalance^(-c/9) of its images). A 1-100-1 weight net (sigmoid output) maps each sample's loss to its
weight in the classifier's loss, and learns, through the classifier's solution, to lower the loss
on a balanced meta set of 100 images (10 per class) held out of training (Shu et al., 2019):

    classifier:  min_θ  mean_i w_φ(ℓ_i) ℓ_i,  ℓ_i = CE(f_θ(x_i), y_i)   SGD(0.1, momentum 0.9, wd 5e-4)
    weighting:   min_φ  CE(f_θ*(φ)(x_meta), y_meta)                    Adam(1e-3), hypergrad below

The baseline trains the same classifier with the same optimizer and steps on the plain mean loss.
Test accuracy is on the balanced 10k test set, mean ± std over seeds; time and peak memory are
per run (peak resident memory above what the process held before the run).

    PYTHONPATH=. python examples/data_reweighting.py          # about 8 minutes on a 2-core CPU
    PYTHONPATH=. python examples/data_reweighting.py --quick  # about 15 seconds (CI)

Without Fashion-MNIST (`--data DIR`, $MLO_FASHION_MNIST, or /usr/share/datasets/fashion-mnist) it
runs on scikit-learn's digits instead (64 features).
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import data as datasets
import mlo
NORMALIZE=False


def mlp(*widths, out=None):
    layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    return nn.Sequential(*layers, *([out] if out else []))


def split(data, imbalance, seed):
    """Return the long-tailed training set, the 100-image balanced meta set and the test set."""
    x, y = data["train"]
    x_meta, y_meta, rest = datasets.balanced_subset(x, y, per_class=10, seed=seed)
    train = datasets.long_tailed(x[rest], y[rest], imbalance, data["num_classes"], seed)
    return train, (x_meta, y_meta), data["test"]


def train(method, data, imbalance, seed, args):
    """Train one classifier (`method` None: the plain baseline); return its test accuracy."""
    (x, y), meta, (x_test, y_test) = split(data, imbalance, seed)
    torch.manual_seed(seed)
    net = mlp(data["num_features"], args.hidden, data["num_classes"])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    loader = datasets.batches(x, y, args.batch, seed)

    if method is None:
        @mlo.level(module=net, optimizer=optimizer, data=loader, scheduler=schedule,
                   name="baseline")
        def baseline(batch, module):
            inputs, labels = batch
            return F.cross_entropy(module(inputs), labels)

        program = mlo.Program(baseline)
    else:
        wnet = mlp(1, 100, 1, out=nn.Sigmoid())

        @mlo.level(module=net, optimizer=optimizer, data=loader, scheduler=schedule)
        def classifier(batch, module, weighting):
            inputs, labels = batch
            loss = F.cross_entropy(module(inputs), labels, reduction="none")
            weights = weighting(loss.detach().unsqueeze(1)).squeeze(1)
            if NORMALIZE: weights = weights / weights.mean().detach()
            return (weights * loss).mean()

        @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=args.meta_lr),
                   data=[meta], hypergrad=method)
        def weighting(batch, classifier):
            inputs, labels = batch
            return F.cross_entropy(classifier(inputs), labels)

        program = mlo.Program(classifier, weighting)
    program.run(args.steps, progress=False)
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean())
