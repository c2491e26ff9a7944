"""Correct and reweight noisy labels: two upper levels learn through one classifier.

An MLP classifier trains on Fashion-MNIST whose labels were corrupted (40% of them, symmetric or
class-dependent "flip" noise, see data.noisy_labels). Two upper levels shape its loss, and both
learn, through the classifier's solution, to lower its loss on a small clean meta set (Meta-Weight-
Net, Shu et al. 2019, and Meta Label Correction, Zheng et al. 2021):

    classifier:  min_θ  mean_i w_φ(ℓ_i) ℓ_i,  ℓ_i = CE(f_θ(x_i), ŷ_ψ(f_θ(x_i), y_i))   SGD
    reweight:    min_φ  CE(f_θ*(x_meta), y_meta)     a 1-100-1 net on the loss ℓ_i, hypergrad
    correct:     min_ψ  CE(f_θ*(x_meta), y_meta)     soft label ŷ from the classifier's
                                                     prediction and the noisy label, hypergrad

`classifier` names both upper levels and both name `classifier`; since only they declare hypergrad,
mlo makes each of them an upper level of `classifier` (two upper levels over one lower level).
The baseline trains the same classifier on the noisy labels with the plain mean loss; "+ reweight"
drops `correct` (ŷ = the noisy label). Test accuracy is on the clean 10k test set; "label acc" is
the fraction of training samples whose corrected label (argmax ŷ) is the true one at the end.

    PYTHONPATH=. python examples/label_correction.py          # about N minutes on a 2-core CPU
    PYTHONPATH=. python examples/label_correction.py --quick  # about 15 seconds (CI)
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import data as datasets
import mlo


def mlp(*widths):
    return nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1])


class Corrector(nn.Module):
    """ŷ = softmax(κ·onehot(y) + g([p, onehot(y)])): starts at (almost) the noisy label, g zero."""

    def __init__(self, num_classes, hidden=64, confidence=5.0):
        super().__init__()
        self.num_classes, self.confidence = num_classes, confidence
        self.g = mlp(2 * num_classes, hidden, num_classes)
        nn.init.zeros_(self.g[-1].weight), nn.init.zeros_(self.g[-1].bias)

    def forward(self, probs, labels):
        onehot = F.one_hot(labels, self.num_classes).float()
        return torch.softmax(self.confidence * onehot + self.g(torch.cat([probs, onehot], 1)), 1)


def train(variant, split, num_classes, seed, args):
    """Train one classifier with `variant` in {"baseline", "reweight", "both"}; return metrics."""
    (x, y_noisy, y_true), meta, (x_test, y_test) = split
    torch.manual_seed(seed)
    net = mlp(x.shape[1], args.hidden, num_classes)
    wnet = nn.Sequential(mlp(1, 100, 1), nn.Sigmoid())
    cnet = Corrector(num_classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    loader = datasets.batches(x, y_noisy, args.batch, seed)
    meta_loader = datasets.batches(*meta, args.batch, seed)

    def soft_labels(logits, labels, correct):
        return correct(logits.detach().softmax(1), labels) if correct is not None \
            else F.one_hot(labels, num_classes).float()

    def classifier_loss(batch, module, reweight=None, correct=None):
        inputs, labels = batch
        logits = module(inputs)
        loss = -(soft_labels(logits, labels, correct) * logits.log_softmax(1)).sum(1)
        if reweight is None:
            return loss.mean()
        weights = reweight(loss.detach().unsqueeze(1)).squeeze(1)
        return (weights * loss).mean()

    def meta_loss(batch, classifier):
        inputs, labels = batch
        return F.cross_entropy(classifier(inputs), labels)

    level = dict(module=net, optimizer=optimizer, data=loader, scheduler=schedule)
    upper = dict(data=meta_loader, hypergrad=args.hypergrad)
    if variant == "baseline":
        @mlo.level(**level)
        def classifier(batch, module):
            return classifier_loss(batch, module)
        program = mlo.Program(classifier)
    elif variant == "reweight":
        @mlo.level(**level)
        def classifier(batch, module, reweight):
            return classifier_loss(batch, module, reweight)

        @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), **upper)
        def reweight(batch, classifier):
            return meta_loss(batch, classifier)
        program = mlo.Program(classifier, reweight)
    else:
        @mlo.level(**level)
        def classifier(batch, module, reweight, correct):
            return classifier_loss(batch, module, reweight, correct)

        @mlo.level(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), **upper)
        def reweight(batch, classifier):
            return meta_loss(batch, classifier)

        @mlo.level(module=cnet, optimizer=torch.optim.Adam(cnet.parameters(), lr=1e-3), **upper)
        def correct(batch, classifier):
            return meta_loss(batch, classifier)
        program = mlo.Program(classifier, reweight, correct)
    if seed == 0 and variant == "both" and args.show_graph:
        print(program.graph)
    start = time.perf_counter()
    program.run(args.steps, progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
        corrected = soft_labels(net(x), y_noisy, cnet if variant == "both" else None).argmax(1)
        label_accuracy = float((corrected == y_true).float().mean())
    return {"test acc": accuracy, "label acc": label_accuracy, "time (s)": seconds}


def make_split(data, kind, args, seed):
    """Noisy training labels, a clean balanced meta set held out of training, the test set."""
    x, y = data["train"]
    x_meta, y_meta, rest = datasets.balanced_subset(x, y, per_class=args.meta_per_class, seed=seed)
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))][:args.train]
    y_noisy, _ = datasets.noisy_labels(y[rest], data["num_classes"], args.noise, kind, seed)
    return (x[rest], y_noisy, y[rest]), (x_meta, y_meta), data["test"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: see data.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--kinds", default="symmetric,flip")
    parser.add_argument("--train", type=int, default=20000, help="training images used")
    parser.add_argument("--meta-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hypergrad", default="aid_fd")
    parser.add_argument("--show-graph", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.train, args.kinds = 1, 30, 2000, "flip"
    torch.set_num_threads(1)  # small models: a second thread adds more contention than speed
    data = datasets.load_fashion_mnist(args.data)
    kinds = args.kinds.split(",")
    variants = {"baseline": "baseline", "reweight": "+ reweight", "both": "+ reweight & correct"}
    results = {}
    for kind in kinds:
        for seed in range(args.seeds):
            split = make_split(data, kind, args, seed)
            for variant in variants:
                results.setdefault((variant, kind), []).append(
                    train(variant, split, data["num_classes"], seed, args))
                print(kind, seed, variant, results[(variant, kind)][-1], flush=True)
    print(f"\n{data['name']}, {args.noise:.0%} label noise, {args.train} noisy training images, "
          f"{args.meta_per_class * data['num_classes']} clean meta images, {args.steps} steps, "
          f"{args.seeds} seeds\n")
    print("| method | " + " | ".join(f"{k} test acc | {k} label acc" for k in kinds) + " | time (s) |")
    print("|---|" + "---|---|" * len(kinds) + "---|")
    for variant, title in variants.items():
        cells = []
        for kind in kinds:
            runs = results[(variant, kind)]
            cells += [_mean_std([r[key] for r in runs]) for key in ("test acc", "label acc")]
        times = [r["time (s)"] for kind in kinds for r in results[(variant, kind)]]
        print(f"| {title} | " + " | ".join(cells) + f" | {sum(times) / len(times):.0f} |")


def _mean_std(values):
    t = torch.tensor(values) * 100
    return f"{t.mean():.1f} ± {t.std() if len(t) > 1 else 0.0:.1f}"


if __name__ == "__main__":
    main()
