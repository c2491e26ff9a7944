"""Differentiable architecture search (DARTS) over a small convolutional cell on Fashion-MNIST.

Images are average-pooled to 14x14 (digits, the fallback, stay 8x8). The network is a stem
h0 = bn(conv3x3(x), stride 2) with C = 16 channels (7x7 maps), one cell of nodes
h_j = Σ_{i<j} o_ij(h_i) for j = 1..3 (6 edges), then global average pooling of relu(h1 + h2 + h3)
and a linear classifier. Each edge's operation is one of seven, which differ in what they can learn:

    zero, identity, 3x3 max pooling, 3x3 average pooling (no parameters),
    3x3, 5x5 and dilated 3x3 (rate 2, 5x5 field) convolutions, each relu -> conv -> bn, C -> C

(bn: batch norm without affine parameters). During search every edge mixes all seven with the
weights softmax(α_e), and the bilevel program is

    classifier:    min_w  CE of the supernet on half of the search images   SGD, one step
    architecture:  min_α  CE of the supernet w*(α) on the other half         Adam, hypergrad

`classifier` names `architecture` (to read the current α) and `architecture` names `classifier`;
only the architecture declares hypergrad, so it is the upper level. The search runs with "aid_fd"
(second-order DARTS) and with "first_order" (first-order DARTS). The cell is derived by DARTS' rule
(each edge keeps its strongest operation other than zero), retrained from scratch on all the search
images and tested on the 10k test set. Controls, retrained with the same budget and seed: random
cells of the same size (a uniformly random operation other than zero on each of the 6 edges) and
each operation alone on every edge.

    PYTHONPATH=. python examples/darts.py          # about 8 minutes on one CPU thread
    PYTHONPATH=. python examples/darts.py --quick  # about 10 seconds (CI)
"""

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import data as datasets
import mlo

OPS = ("zero", "identity", "max_pool", "avg_pool", "conv3", "conv5", "dil_conv3")
NODES = 3
METHODS = ("aid_fd", "first_order")
EDGES = [(i, j) for j in range(1, NODES + 1) for i in range(j)]


def make_op(name, channels):
    if name == "identity":
        return nn.Identity()
    if name == "max_pool":
        return nn.MaxPool2d(3, stride=1, padding=1)
    if name == "avg_pool":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    size, dilation = (3, 2) if name == "dil_conv3" else (int(name[-1]), 1)
    return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, size, padding=dilation * (size // 2),
                                              dilation=dilation, bias=False),
                         nn.BatchNorm2d(channels, affine=False))


class Cell(nn.Module):
    """Stem, one cell with the operations `ops[e]` on edge e (all of OPS in the supernet, one in a
    derived cell), global pooling and a linear classifier."""

    def __init__(self, channels, classes, ops):
        super().__init__()
        self.ops = ops
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels, affine=False))
        self.edges = nn.ModuleList(nn.ModuleDict({name: make_op(name, channels)
                                                  for name in names if name != "zero"})
                                   for names in ops)
        self.head = nn.Linear(channels, classes)

    def forward(self, x, weights=None):
        """`weights[e, k]` scales op k of edge e (softmax(α) in the supernet); None: all ones."""
        side = int(x.shape[1] ** 0.5)
        states = [self.stem(x.view(-1, 1, side, side))]
        for j in range(1, NODES + 1):
            node = 0
            for e in (e for e, (_, target) in enumerate(EDGES) if target == j):
                for k, name in enumerate(self.ops[e]):
                    if name != "zero":
                        out = self.edges[e][name](states[EDGES[e][0]])
                        node = node + (out if weights is None else weights[e, k] * out)
            states.append(node)
        return self.head(F.relu(sum(states[1:])).mean((2, 3)))


def derive(alpha):
    """DARTS' rule: each edge keeps its strongest operation other than zero."""
    return [OPS[1 + int(k)] for k in alpha[:, 1:].argmax(1)]


def search(method, split, args, seed):
    """Run the bilevel search with `method`; return the derived cell (one op per edge)."""
    (x_w, y_w), (x_a, y_a) = split
    torch.manual_seed(seed)
    net = Cell(args.channels, args.classes, [OPS] * len(EDGES))
    alpha = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=3e-4)

    @mlo.level(module=net, optimizer=optimizer, data=datasets.batches(x_w, y_w, args.batch, seed),
               scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.search_steps))
    def classifier(batch, module, architecture):
        inputs, labels = batch
        return F.cross_entropy(module(inputs, architecture().softmax(1)), labels)

    @mlo.level(module=alpha, data=datasets.batches(x_a, y_a, args.batch, seed + 1),
               optimizer=torch.optim.Adam([alpha], lr=args.alpha_lr, betas=(0.5, 0.999),
                                          weight_decay=1e-3), hypergrad=method)
    def architecture(batch, module, classifier):
        inputs, labels = batch
        return F.cross_entropy(classifier(inputs, module().softmax(1)), labels)

    mlo.Program(classifier, architecture).run(args.search_steps, progress=False)
    return derive(alpha.detach())


def retrain(cell, split, test, args, seed):
    """Train `cell` from scratch on all search images; return its test accuracy."""
    x, y = (torch.cat(parts) for parts in zip(*split))
    torch.manual_seed(seed)
    net = Cell(args.channels, args.classes, [[op] for op in cell])
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=3e-4)

    @mlo.level(module=net, optimizer=optimizer, data=datasets.batches(x, y, args.batch, seed),
               scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.retrain_steps))
    def retrained(batch, module):
        inputs, labels = batch
        return F.cross_entropy(module(inputs), labels)

    mlo.Program(retrained).run(args.retrain_steps, progress=False)
    net.eval()
    with torch.no_grad():  # in chunks: one 10k-image batch runs slower than 20 small ones
        predicted = torch.cat([net(chunk).argmax(1) for chunk in test[0].split(500)])
    return float((predicted == test[1]).float().mean())


def shrink(x, side=14):
    """Average-pool flat square images to at most side x side (28x28 -> 14x14; 8x8 stays)."""
    full = int(x.shape[1] ** 0.5)
    if full <= side:
        return x
    return F.avg_pool2d(x.view(-1, 1, full, full), full // side).flatten(1)


def describe(cell):
    """'h1 = conv5(h0); h2 = ...': each node as the sum of its edges' operations."""
    return "; ".join(f"h{j} = " + " + ".join(f"{op}(h{i})" for (i, target), op in zip(EDGES, cell)
                                             if target == j) for j in range(1, NODES + 1))


def run_seed(seed, data, test, args):
    """Search with each method on this seed's images, then retrain the found cells and the controls.

    Returns {row: [test accuracy of each cell]} and, for the found cells, {row: [search seconds]}.
    """
    x, y = data["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:args.images]
    x, y, half = shrink(x[order]), y[order], len(order) // 2
    split = ((x[:half], y[:half]), (x[half:], y[half:]))
    rng = random.Random(seed)
    cells, seconds = {}, {}
    for method in METHODS:
        start = time.perf_counter()
        cells[f"found by {method}"] = [search(method, split, args, seed)]
        seconds[f"found by {method}"] = [time.perf_counter() - start]
    cells["random"] = [[rng.choice(OPS[1:]) for _ in EDGES] for _ in range(args.random_cells)]
    cells.update({f"{op} everywhere": [[op] * len(EDGES)] for op in OPS[1:]})
    accs = {row: [retrain(cell, split, test, args, seed) for cell in group]
            for row, group in cells.items()}
    for row, group in cells.items():
        for cell, acc in zip(group, accs[row]):
            shown = "" if row.endswith("everywhere") else f", {describe(cell)}"
            print(f"seed {seed}, {row}: {100 * acc:.1f}%{shown}", flush=True)
    return accs, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: see examples/data.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=6000, help="search images (half for α)")
    parser.add_argument("--search-steps", type=int, default=300)
    parser.add_argument("--retrain-steps", type=int, default=500)
    parser.add_argument("--random-cells", type=int, default=4, help="random cells per seed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--alpha-lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models: a second thread costs more in contention than it saves
    data = datasets.load_fashion_mnist(args.data)
    args.classes = data["num_classes"]
    test = (shrink(data["test"][0]), data["test"][1])
    if args.quick:
        args.seeds, args.images, args.search_steps, args.retrain_steps = 1, 1000, 3, 4
        args.random_cells, test = 1, (test[0][:500], test[1][:500])
    accs, seconds = {}, {}
    for seed in range(args.seeds):
        for table, values in zip((accs, seconds), run_seed(seed, data, test, args)):
            for row, value in values.items():
                table.setdefault(row, []).extend(value)
    print(f"\n{data['name']}: {args.images} search images, {args.search_steps} search steps, "
          f"{args.retrain_steps} retraining steps, {args.random_cells} random cell(s) per seed; "
          f"mean ± std over {args.seeds} seed(s)\n")
    print("| cell (6 edges, one operation each) | test acc (%) | search time (s) |\n|---|---|---|")
    for row, values in accs.items():
        time_s = f"{sum(seconds[row]) / len(seconds[row]):.0f}" if row in seconds else ""
        print(f"| {row} | {_mean_std(values)} | {time_s} |")


def _mean_std(values):
    t = torch.tensor(values) * 100
    return f"{t.mean():.1f} ± {t.std() if len(t) > 1 else 0.0:.1f}"


if __name__ == "__main__":
    main()
