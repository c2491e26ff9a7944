"""Pretrain on a shifted, partly mislabeled source, finetune on a small clean target, and learn
per-sample source weights through both: a trilevel program with two hypergradient paths.

The source is 10,000 Fashion-MNIST training images with a random contrast cut and pixel noise, 40%
of them "harmful": their labels go through one fixed derangement of the classes
(data.shifted_domain).
The target is the clean domain: 100 training images, 100 validation images and the 10k test set.
As in the "learning by ignoring" setting of multilevel-optimization papers, the weights are one
logit per source sample, w_i = sigmoid(φ_i):

    pretrain:  min_θp  Σ_i w_i ℓ_i / Σ_i w_i,   ℓ_i = CE(f_θp(x_i), y_i) on the source     SGD
    finetune:  min_θf  CE(f_θf(x), y) on the target + λ/2 ‖θf − θp*‖²                   SGD
    reweight:  min_φ   CE(f_θf*(x_val), y_val) + CE(f_θp*(x_val), y_val)    Adam, hypergrad

`pretrain` names `reweight` (which declares hypergrad, so it is above pretrain), `finetune` names
`pretrain` (neither declares hypergrad, so pretrain is below finetune) and `reweight` names both, so
its hypergradient sums two paths: reweight -> pretrain -> reweight and reweight -> pretrain ->
finetune -> reweight. Pretrain takes `unroll` = 5 steps per finetune and reweight step (so `itd`
differentiates through 5 source batches) and 3000 steps in all, 30 source epochs: long enough for
unweighted pretraining to memorize the harmful labels. The baseline is the same pretrain +
finetune program without `reweight`, with the same steps; "target only" is finetune with λ = 0
(no pretraining). The last column is the mean normalized weight (w_i / mean w) of the harmful and
of the clean source samples at the end.

    PYTHONPATH=. python examples/domain_adaptation.py          # about 2 minutes on a 2-core CPU
    PYTHONPATH=. python examples/domain_adaptation.py --quick  # about 6 seconds (CI)
    # the milder setting, where finetuning repairs the harm by itself:
    PYTHONPATH=. python examples/domain_adaptation.py --harmful 0.2 --steps 1500 --unroll 1
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


def make_domains(data, args, seed):
    """Return the shifted source (x, y, harmful mask), target train, target validation and test."""
    x, y = data["train"]
    x_train, y_train, rest = datasets.balanced_subset(x, y, args.target_per_class, seed)
    x_val, y_val, _ = datasets.balanced_subset(x[rest], y[rest], args.target_per_class, seed + 1)
    order = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    source = order[args.target_per_class * data["num_classes"]:][:args.source]
    x_source, y_source, harmful = datasets.shifted_domain(
        x[source], y[source], seed, harmful_fraction=args.harmful, num_classes=data["num_classes"])
    return (x_source, y_source, harmful), (x_train, y_train), (x_val, y_val), data["test"]


def train(variant, domains, num_classes, seed, args):
    """Run one program; `variant` is "target", "baseline" or "trilevel". Return its metrics."""
    (x_s, y_s, harmful), target, (x_val, y_val), (x_test, y_test) = domains
    torch.manual_seed(seed)
    pnet = mlp(x_s.shape[1], args.hidden, num_classes)
    fnet = mlp(x_s.shape[1], args.hidden, num_classes)
    fnet.load_state_dict(pnet.state_dict())
    logits = nn.Parameter(torch.zeros(len(y_s)))  # one weight per source sample: sigmoid(logit)
    proximal = 0.0 if variant == "target" else args.proximal

    def sgd(net, lr, weight_decay):
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    def source_losses(batch, module):
        inputs, (labels, index) = batch[0], batch[1].unbind(1)
        return F.cross_entropy(module(inputs), labels, reduction="none"), index

    @mlo.level(module=fnet, optimizer=sgd(fnet, args.finetune_lr, 0.0),
               data=datasets.batches(*target, args.batch, seed))
    def finetune(batch, module, pretrain):
        inputs, labels = batch
        distance = sum(((p - q) ** 2).sum() for p, q in
                       zip(module.params.values(), pretrain.params.values()))
        return F.cross_entropy(module(inputs), labels) + proximal / 2 * distance

    @mlo.level(module=logits, data=[(x_val, y_val)], hypergrad=args.hypergrad,
               optimizer=torch.optim.Adam([logits], lr=args.weight_lr, betas=(0.5, 0.999)))
    def reweight(batch, finetune, pretrain):
        inputs, labels = batch
        return F.cross_entropy(finetune(inputs), labels) + F.cross_entropy(pretrain(inputs), labels)

    labels_and_index = torch.stack([y_s, torch.arange(len(y_s))], 1)  # so batches carry indices
    source = dict(module=pnet, optimizer=sgd(pnet, args.lr, 5e-4), unroll=args.unroll,
                  data=datasets.batches(x_s, labels_and_index, args.batch, seed))
    if variant == "trilevel":
        @mlo.level(**source)
        def pretrain(batch, module, reweight):
            loss, index = source_losses(batch, module)
            weights = reweight()[index].sigmoid()
            return (weights * loss).sum() / weights.sum()  # only the relative weights matter
        program = mlo.Program(pretrain, finetune, reweight)
    else:
        @mlo.level(**source)
        def pretrain(batch, module):
            return source_losses(batch, module)[0].mean()
        program = mlo.Program(pretrain, finetune)
    if variant == "trilevel" and seed == 0 and args.show_graph:
        print(program.graph)
    start = time.perf_counter()
    program.run(args.steps, progress=False)
    with torch.no_grad():
        accuracy = lambda net: float((net(x_test).argmax(1) == y_test).float().mean())
        weights = logits.sigmoid() / logits.sigmoid().mean()
    return {"finetune": accuracy(fnet), "pretrain": accuracy(pnet),
            "harmful": float(weights[harmful].mean()), "clean": float(weights[~harmful].mean()),
            "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: see examples/data.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--source", type=int, default=10000, help="source images")
    parser.add_argument("--harmful", type=float, default=0.4, help="fraction of deranged labels")
    parser.add_argument("--target-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3000, help="pretrain steps")
    parser.add_argument("--unroll", type=int, default=5, help="pretrain steps per finetune step")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--proximal", type=float, default=1.0, help="λ of the proximal term")
    parser.add_argument("--hypergrad", default="itd")
    parser.add_argument("--weight-lr", type=float, default=0.05)
    parser.add_argument("--show-graph", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.source = 1, 20, 1000
    torch.set_num_threads(1)  # small models: a second thread costs more in contention than it saves
    data = datasets.load_fashion_mnist(args.data)
    variants = {"target": "target only (λ = 0)", "baseline": "pretrain → finetune",
                "trilevel": "pretrain → finetune + reweight"}
    results = {v: [] for v in variants}
    for seed in range(args.seeds):
        domains = make_domains(data, args, seed)
        for variant in variants:
            results[variant].append(train(variant, domains, data["num_classes"], seed, args))
    print(f"\n{data['name']}: {args.source} shifted source images ({args.harmful:.0%} harmful), "
          f"{args.target_per_class * data['num_classes']} target images, {args.steps} steps "
          f"(unroll {args.unroll}), "
          f"λ = {args.proximal}, hypergrad {args.hypergrad!r}; mean ± std over {args.seeds} "
          f"seed(s)\n")
    print("| program | target test acc, finetuned (%) | target test acc, pretrained (%) | "
          "weight of harmful / clean source samples | time / run (s) |\n|---|---|---|---|---|")
    for variant, title in variants.items():
        runs = results[variant]
        weights = "1 / 1" if variant != "trilevel" else (
            f"{_mean_std([r['harmful'] for r in runs], 1, 2)} / "
            f"{_mean_std([r['clean'] for r in runs], 1, 2)}")
        print(f"| {title} | {_mean_std([r['finetune'] for r in runs])} | "
              f"{_mean_std([r['pretrain'] for r in runs])} | {weights} | "
              f"{sum(r['seconds'] for r in runs) / len(runs):.1f} |")


def _mean_std(values, scale=100, digits=1):
    t = torch.tensor(values) * scale
    return f"{t.mean():.{digits}f} ± {t.std() if len(t) > 1 else 0.0:.{digits}f}"


if __name__ == "__main__":
    main()
