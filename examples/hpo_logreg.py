"""Learn one weight decay per feature of a logistic regression by hypergradient descent.

A standard synthetic HPO problem: x ~ N(0, I_d), y = 1[x·w_true + 0.1ε > 0],
split 1/4 : 1/4 : 1/2 into train, validation and test. Here only the first `--informative`
entries of w_true are non-zero, so that a decay per feature has something to find (shrink the noise
features, free the informative ones). The bilevel program:

    weights:  min_w  BCE(x_train w, y_train) + 0.5 Σ_j exp(λ_j) w_j²   (SGD, `--unroll` steps)
    decay:    min_λ  BCE(x_val w*(λ), y_val)                          (Adam, one step per unroll)

The same program is solved with each hypergradient method (itd, aid_cg, aid_neumann, aid_fd, all
with 20 inner steps per outer step) and compared by validation loss against outer steps and against
wall time, and by test accuracy. The row "fixed λ" is the same program with hypergrad=
"first_order": λ has no direct gradient, so it keeps its initial value and only the weights train. λ starts at
-2 and is clamped to exp(λ) <= 1/lr, where inner SGD (and the Neumann series) stay stable.

    PYTHONPATH=. python examples/hpo_logreg.py            # about 40 seconds on a 2-core CPU
    PYTHONPATH=. python examples/hpo_logreg.py --quick    # a few seconds (CI)

Plots go to examples/out/ (or --out) when matplotlib is installed.
"""

import argparse
import math
import pathlib
import time

import torch
import torch.nn.functional as F

import mlo

METHODS = {"itd": mlo.hypergrad.itd(), "aid_cg": mlo.hypergrad.aid_cg(iters=20),
           "aid_neumann": mlo.hypergrad.aid_neumann(iters=20), "aid_fd": mlo.hypergrad.aid_fd()}


def make_problem(n, d, informative, seed):
    """Return {"train", "val", "test"} splits (x, y) of the synthetic problem, 1/4 : 1/4 : 1/2."""
    generator = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(d)
    w_true[:informative] = torch.randn(informative, generator=generator)
    x = torch.randn(n, d, generator=generator)
    y = (x @ w_true + 0.1 * torch.randn(n, generator=generator) > 0).float()
    cut = (n // 4, n // 2)
    return {"train": (x[:cut[0]], y[:cut[0]]), "val": (x[cut[0]:cut[1]], y[cut[0]:cut[1]]),
            "test": (x[cut[1]:], y[cut[1]:])}


def solve(method, splits, args):
    """Solve the program with `method` (None: first_order, so λ stays fixed).

    Returns the curve of (seconds, validation loss) per outer step, the test accuracy and exp(λ).
    """
    d = splits["train"][0].shape[1]
    w = torch.zeros(d, requires_grad=True)
    log_decay = torch.full((d,), args.init_log_decay, requires_grad=True)

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=args.inner_lr),
               data=[splits["train"]], unroll=args.unroll)
    def weights(batch, module, decay):
        x, y = batch
        w = module()
        return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (decay().exp() * w ** 2).sum()

    @mlo.level(module=log_decay, optimizer=torch.optim.Adam([log_decay], lr=args.outer_lr),
               data=[splits["val"]], hypergrad=method or "first_order")
    def decay(batch, weights):
        x, y = batch
        return F.binary_cross_entropy_with_logits(x @ weights(), y)

    program = mlo.Program(weights, decay)
    curve, start = [], time.perf_counter()
    for _ in range(args.outer_steps * args.unroll):
        losses = program.step()
        with torch.no_grad():  # keep lr·exp(λ) < 1, where inner SGD (and Neumann) stay stable
            log_decay.clamp_(max=-math.log(args.inner_lr))
        if "decay" in losses:  # the outer cost is the validation loss at the current weights
            curve.append((time.perf_counter() - start, losses["decay"]))
    x, y = splits["test"]
    accuracy = float(((x @ w.detach() > 0).float() == y).float().mean())
    return curve, accuracy, log_decay.detach().exp()


def report(results, args):
    """Print a markdown table (mean ± std over seeds) and save the two plots."""
    print("\n| method | val loss, outer step 1 | val loss, last | test accuracy | time (s) | "
          "ms / outer step | exp(λ) informative / noise |\n|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        first, last = (torch.tensor([c[i][1] for c, _, _ in runs]) for i in (0, -1))
        accuracy = torch.tensor([a for _, a, _ in runs])
        seconds = torch.tensor([c[-1][0] for c, _, _ in runs])
        decay = torch.stack([d for _, _, d in runs])
        informative, noise = decay[:, :args.informative], decay[:, args.informative:]
        print(f"| {name} | {first.mean():.3f} | {last.mean():.3f} ± {_std(last):.3f} | "
              f"{accuracy.mean():.3f} ± {_std(accuracy):.3f} | {seconds.mean():.2f} | "
              f"{1000 * seconds.mean() / len(runs[0][0]):.1f} | "
              f"{informative.median():.3g} / {noise.median():.3g} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots.")
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for axis, file in (("outer step", "steps"), ("wall time (s)", "time")):
        plt.figure(figsize=(5, 3.5))
        for name, runs in results.items():
            curve = torch.tensor([c for c, _, _ in runs]).mean(0)  # over seeds: step x (s, loss)
            x = curve[:, 0] if axis.startswith("wall") else torch.arange(1, len(curve) + 1)
            plt.plot(x, curve[:, 1], label=name)
        plt.xlabel(axis), plt.ylabel("validation loss"), plt.yscale("log"), plt.legend()
        plt.tight_layout(), plt.savefig(out / f"hpo_logreg_{file}.png", dpi=120), plt.close()
        print(f"saved {out / f'hpo_logreg_{file}.png'}")


def _std(t):
    return float(t.std()) if len(t) > 1 else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="1/4 train, 1/4 val, 1/2 test")
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--informative", type=int, default=10)
    parser.add_argument("--unroll", type=int, default=20, help="inner steps per outer step")
    parser.add_argument("--outer-steps", type=int, default=200)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--init-log-decay", type=float, default=-2.0)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "out"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.outer_steps = 1, 10
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention and timing noise

    problems = [make_problem(args.samples, args.features, args.informative, seed)
                for seed in range(args.seeds)]
    for method in [None, *METHODS.values()]:  # pay one-time lazy imports before any timed run
        solve(method, problems[0], argparse.Namespace(**{**vars(args), "outer_steps": 1}))
    results = {name: [solve(METHODS.get(name), problem, args) for problem in problems]
               for name in ["fixed λ", *METHODS]}
    report(results, args)


if __name__ == "__main__":
    main()
