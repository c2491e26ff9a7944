"""Reweight and correct noisy labels: two upper levels learn through one classifier.

An MLP classifier trains on 5,000 Fashion-MNIST images whose labels were corrupted (40% of them,
symmetric or class-dependent "flip" noise c -> c+1, see data.noisy_labels). Two upper levels shape
its loss, and both learn, through the classifier's solution, to lower its loss on a clean meta set
of 100 images (Meta-Weight-Net; Meta Label Correction):

    classifier:  min_θ  Σ_i w_i ℓ_i / Σ_i w_i,  ℓ_i = CE(f_θ(x_i), ŷ_ψ(p_i, y_i)), w_i = w_φ(ℓ_i)
    reweight:    min_φ  CE(f_θ*(x_meta), y_meta)   w_φ: a 1-100-1 net on the sample's loss
    correct:     min_ψ  CE(f_θ*(x_meta), y_meta)   ŷ_ψ: a soft label from the classifier's
                                                   prediction p_i and the noisy label y_i

`classifier` names both upper levels and both name `classifier`; only they declare hypergrad, so
mlo makes each an upper level of `classifier`. The baseline trains the same classifier on the noisy
labels with the plain mean loss; "+ reweight" drops `correct` (ŷ = the noisy label); the oracle
trains on the true labels. Test accuracy is on the clean 10k test set; "label acc" is the fraction
of training labels argmax ŷ that are right at the end (60% for the noisy labels themselves).

    PYTHONPATH=. python examples/label_correction.py          # about 4.5 minutes on a 2-core CPU
    PYTHONPATH=. python examples/label_correction.py --quick  # about 6 seconds (CI)

The default hypergradient is "itd" with unroll 1, the one-step look-ahead of both papers; "aid_fd"
takes the same look-ahead at the current parameters (its mixed product is exact, so it respects the
`loss.detach()` that feeds the weight net).
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import data as datasets
import mlo


def mlp(*widths):
    layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])


class Corrector(nn.Module):
    """ŷ = softmax(skip(z) + g(z)), z = [p, onehot(y)]; starts at softmax(κ·onehot(y)), g = 0."""

    def __init__(self, num_classes, hidden=64, confidence=4.0):
        super().__init__()
        self.num_classes = num_classes
        self.skip = nn.Linear(2 * num_classes, num_classes)
        self.g = mlp(2 * num_classes, hidden, num_classes)
        with torch.no_grad():
            for layer in (self.skip, self.g[-1]):
                layer.weight.zero_(), layer.bias.zero_()
            self.skip.weight[:, num_classes:] = confidence * torch.eye(num_classes)

    def forward(self, probs, labels):
        z = torch.cat([probs, F.one_hot(labels, self.num_classes).float()], 1)
        return torch.softmax(self.skip(z) + self.g(z), 1)


def train(variant, split, num_classes, seed, args):
    """Train one classifier; `variant` is "oracle", "baseline", "reweight" or "both"."""
    (x, y_noisy, y_true), meta, (x_test, y_test) = split
    torch.manual_seed(seed)
    net = mlp(x.shape[1], args.hidden, num_classes)
    wnet, cnet = nn.Sequential(mlp(1, 100, 1), nn.Sigmoid()), Corrector(num_classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    labels = y_true if variant == "oracle" else y_noisy
    lower = dict(module=net, optimizer=optimizer, scheduler=schedule,
                 data=datasets.batches(x, labels, args.batch, seed))

    def meta_level(module, lr):
        return mlo.level(module=module, optimizer=torch.optim.Adam(module.parameters(), lr=lr),
                         data=datasets.batches(*meta, args.batch, seed), hypergrad=args.hypergrad)

    def soft_labels(logits, labels, correct=None):
        if correct is None:
            return F.one_hot(labels, num_classes).float()
        return correct(logits.detach().softmax(1), labels)  # the classifier may not move its target

    def classifier_loss(batch, module, reweight=None, correct=None):
        inputs, labels = batch
        logits = module(inputs)
        loss = -(soft_labels(logits, labels, correct) * logits.log_softmax(1)).sum(1)
        if reweight is None:
            return loss.mean()
        weights = reweight(loss.detach().unsqueeze(1)).squeeze(1)
        return (weights * loss).sum() / weights.sum()  # normalized: only relative weights matter

    def meta_loss(batch, classifier):
        inputs, labels = batch
        return F.cross_entropy(classifier(inputs), labels)

    @meta_level(wnet, lr=1e-3)
    def reweight(batch, classifier):
        return meta_loss(batch, classifier)

    @meta_level(cnet, lr=1e-2)
    def correct(batch, classifier):  # the same meta loss, learned through the labels instead
        return meta_loss(batch, classifier)

    if variant in ("oracle", "baseline"):
        @mlo.level(**lower)
        def classifier(batch, module):
            return classifier_loss(batch, module)
        uppers = ()
    elif variant == "reweight":
        @mlo.level(**lower)
        def classifier(batch, module, reweight):
            return classifier_loss(batch, module, reweight)
        uppers = (reweight,)
    else:
        @mlo.level(**lower)
        def classifier(batch, module, reweight, correct):
            return classifier_loss(batch, module, reweight, correct)
        uppers = (reweight, correct)
    program = mlo.Program(classifier, *uppers)
    if variant == "both" and seed == 0 and args.show_graph:
        print(program.graph)
    start = time.perf_counter()
    program.run(args.steps, progress=False)
    with torch.no_grad():
        corrected = soft_labels(net(x), labels, cnet if variant == "both" else None).argmax(1)
        return {"test": float((net(x_test).argmax(1) == y_test).float().mean()),
                "labels": float((corrected == y_true).float().mean()),
                "seconds": time.perf_counter() - start}


def make_split(data, kind, args, seed):
    """Return (x, noisy y, true y) to train on, a clean balanced meta set held out, the test set."""
    x, y = data["train"]
    x_meta, y_meta, rest = datasets.balanced_subset(x, y, per_class=args.meta_per_class, seed=seed)
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))
    rest = rest[order][:args.train]
    y_noisy, _ = datasets.noisy_labels(y[rest], data["num_classes"], args.noise, kind, seed)
    return (x[rest], y_noisy, y[rest]), (x_meta, y_meta), data["test"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: see examples/data.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--kinds", default="symmetric,flip", help="comma-separated noise kinds")
    parser.add_argument("--train", type=int, default=5000, help="noisy training images")
    parser.add_argument("--meta-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hypergrad", default="itd")
    parser.add_argument("--show-graph", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.train, args.kinds = 1, 20, 1000, "flip"
    torch.set_num_threads(1)  # small models: a second thread costs more in contention than it saves
    data = datasets.load_fashion_mnist(args.data)
    kinds = args.kinds.split(",")
    variants = {"oracle": "clean labels (oracle)", "baseline": "noisy labels (baseline)",
                "reweight": "+ reweight", "both": "+ reweight & correct"}
    results = {}
    for kind in kinds:
        for seed in range(args.seeds):
            split = make_split(data, kind, args, seed)
            for variant in variants:
                results.setdefault((variant, kind), []).append(
                    train(variant, split, data["num_classes"], seed, args))
    print(f"\n{data['name']}: {args.noise:.0%} noisy labels on {args.train} training images, "
          f"{args.meta_per_class * data['num_classes']} clean meta images, {args.steps} steps, "
          f"hypergrad {args.hypergrad!r}; mean ± std over {args.seeds} seed(s)\n")
    print("| method | " + " | ".join(f"{k}: test acc (%) | {k}: label acc (%)" for k in kinds)
          + " | time / run (s) |")
    print("|---|" + "---|---|" * len(kinds) + "---|")
    for variant, title in variants.items():
        runs = [results[(variant, kind)] for kind in kinds]
        cells = [_mean_std([r[key] * 100 for r in rs]) for rs in runs for key in ("test", "labels")]
        seconds = [r["seconds"] for rs in runs for r in rs]
        print(f"| {title} | " + " | ".join(cells) + f" | {sum(seconds) / len(seconds):.1f} |")


def _mean_std(values):
    t = torch.tensor(values)
    return f"{t.mean():.1f} ± {t.std() if len(t) > 1 else 0.0:.1f}"


if __name__ == "__main__":
    main()
