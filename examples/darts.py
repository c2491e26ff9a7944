"""Differentiable architecture search (DARTS) over an MLP cell on Fashion-MNIST.

The search space is one cell: a stem h0 = relu(W x), then nodes h_j = Σ_{i<j} o_ij(h_i) for
j = 1..3 (6 edges), and logits = head(h1 + h2 + h3). Each edge's operation is one of zero,
identity, linear+relu and linear+tanh. During search every edge mixes all four with the weights
softmax(α_ij), and the bilevel program is

    classifier:    min_w  CE of the supernet on half of the search images   SGD, `unroll` steps
    architecture:  min_α  CE of the supernet w*(α) on the other half         Adam, hypergrad

`classifier` names `architecture` (to read the current α) and `architecture` names `classifier`;
only the architecture declares hypergrad, so it is the upper level. The search runs with "aid_fd"
(DARTS' second-order finite difference) with unroll 1 and 3, and with "first_order" (first-order
DARTS). The architecture is derived by DARTS' rule (each edge's strongest op other than zero; each
node keeps its strongest input edge), retrained from scratch on all the search images and tested on
the 10k test set, against a random architecture of the same size (one input per node, as many
linear ops) given the same retraining budget.

    PYTHONPATH=. python examples/darts.py          # about 1.5 minutes on a 2-core CPU
    PYTHONPATH=. python examples/darts.py --quick  # about 6 seconds (CI)
"""

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import data as datasets
import mlo

OPS = ("zero", "identity", "linear+relu", "linear+tanh")
NODES = 3
EDGES = [(i, j) for j in range(1, NODES + 1) for i in range(j)]


def make_op(name, hidden):
    if name == "identity":
        return nn.Identity()
    activation = nn.ReLU() if name == "linear+relu" else nn.Tanh()
    return nn.Sequential(nn.Linear(hidden, hidden), activation)


class Cell(nn.Module):
    """The cell with the operations `ops[e]` on edge e: all of OPS in the supernet, one or none
    in a derived architecture."""

    def __init__(self, features, hidden, classes, ops):
        super().__init__()
        self.ops = ops
        self.stem, self.head = nn.Linear(features, hidden), nn.Linear(hidden, classes)
        self.edges = nn.ModuleList(nn.ModuleDict({name.replace("+", "_"): make_op(name, hidden)
                                                  for name in names if name != "zero"})
                                   for names in ops)

    def forward(self, x, weights=None):
        """`weights[e, k]` scales op k of edge e (softmax(α) in the supernet); None: all ones."""
        states = [F.relu(self.stem(x))]
        for j in range(1, NODES + 1):
            node = torch.zeros_like(states[0])
            for e in (e for e, (_, target) in enumerate(EDGES) if target == j):
                for k, name in enumerate(self.ops[e]):
                    if name != "zero":
                        out = self.edges[e][name.replace("+", "_")](states[EDGES[e][0]])
                        node = node + (out if weights is None else weights[e, k] * out)
            states.append(node)
        return self.head(sum(states[1:]))


def derive(alpha):
    """DARTS' rule: each edge's strongest op other than zero; each node keeps its strongest edge.

    Returns the architecture as (input node, op) for nodes 1..NODES.
    """
    strength, best = alpha.softmax(1)[:, 1:].max(1)
    arch = []
    for j in range(1, NODES + 1):
        e = max((e for e, (_, target) in enumerate(EDGES) if target == j),
                key=lambda e: strength[e])
        arch.append((EDGES[e][0], OPS[1 + int(best[e])]))
    return arch


def search(method, unroll, split, args, seed):
    """Run the bilevel search with `method`; return the derived architecture."""
    (x_w, y_w), (x_a, y_a) = split
    torch.manual_seed(seed)
    net = Cell(x_w.shape[1], args.hidden, args.classes, [OPS] * len(EDGES))
    alpha = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=3e-4)

    @mlo.level(module=net, optimizer=optimizer, data=datasets.batches(x_w, y_w, args.batch, seed),
               scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.search_steps),
               unroll=unroll)
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


def retrain(arch, split, test, args, seed):
    """Train `arch` from scratch on all search images; return its test accuracy."""
    x, y = (torch.cat(parts) for parts in zip(*split))
    torch.manual_seed(seed)
    chosen = {(i, j): op for j, (i, op) in enumerate(arch, start=1)}
    net = Cell(x.shape[1], args.hidden, args.classes,
               [[chosen[e]] if e in chosen else [] for e in EDGES])
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=3e-4)

    @mlo.level(module=net, optimizer=optimizer, data=datasets.batches(x, y, args.batch, seed),
               scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.retrain_steps))
    def retrained(batch, module):
        inputs, labels = batch
        return F.cross_entropy(module(inputs), labels)

    mlo.Program(retrained).run(args.retrain_steps, progress=False)
    with torch.no_grad():
        return float((net(test[0]).argmax(1) == test[1]).float().mean())


def random_like(arch, seed):
    """A random architecture with as many linear ops as `arch` (so as many parameters)."""
    rng = random.Random(seed)
    linear = set(rng.sample(range(NODES), sum(op != "identity" for _, op in arch)))
    return [(rng.randrange(j), rng.choice(OPS[2:]) if j - 1 in linear else "identity")
            for j in range(1, NODES + 1)]


def describe(arch):
    return ", ".join(f"h{j} = {op}(h{i})" for j, (i, op) in enumerate(arch, start=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: see examples/data.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10000, help="search images (half for α)")
    parser.add_argument("--search-steps", type=int, default=1000)
    parser.add_argument("--retrain-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha-lr", type=float, default=3e-3)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.images, args.search_steps, args.retrain_steps = 1, 1000, 12, 10
    torch.set_num_threads(1)  # small models: a second thread costs more in contention than it saves
    data = datasets.load_fashion_mnist(args.data)
    args.classes = data["num_classes"]
    methods = {"aid_fd, unroll 1": ("aid_fd", 1), "aid_fd, unroll 3": ("aid_fd", 3),
               "first_order": ("first_order", 1)}
    results = {name: [] for name in methods}
    for seed in range(args.seeds):
        x, y = data["train"]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:args.images]
        half = len(order) // 2
        split = ((x[order[:half]], y[order[:half]]), (x[order[half:]], y[order[half:]]))
        for name, (method, unroll) in methods.items():
            start = time.perf_counter()
            arch = search(method, unroll, split, args, seed)
            seconds = time.perf_counter() - start
            control = random_like(arch, seed)
            results[name].append({"arch": arch, "seconds": seconds,
                                  "found": retrain(arch, split, data["test"], args, seed),
                                  "random acc": retrain(control, split, data["test"], args, seed)})
            print(f"seed {seed}, {name}: {describe(arch)}", flush=True)
    print(f"\n{data['name']}: {args.images} search images, {args.search_steps} search steps, "
          f"{args.retrain_steps} retraining steps; mean ± std over {args.seeds} seed(s)\n")
    print("| search | found architecture (seed 0) | search time (s) | test acc, found (%) | "
          "test acc, random of same size (%) |\n|---|---|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {describe(runs[0]['arch'])} | "
              f"{sum(r['seconds'] for r in runs) / len(runs):.0f} | "
              f"{_mean_std([r['found'] for r in runs])} | "
              f"{_mean_std([r['random acc'] for r in runs])} |")


def _mean_std(values):
    t = torch.tensor(values) * 100
    return f"{t.mean():.1f} ± {t.std() if len(t) > 1 else 0.0:.1f}"


if __name__ == "__main__":
    main()
