"""Meta-learning: a level that starts each unroll window from an upper level's parameters.

Written with `mlo.Init` (the start), `tasks=T` (meta-batches) and a learned learning rate (an
upper level's tensor in the lower level's optimizer):

- **MAML**: the lower level `adapt(batch, module, meta: mlo.Init)` takes `unroll` steps from
  θ₀ = φ on the support batches; `meta` (cost: the query loss of `adapt`) declares
  `hypergrad="itd"`, which differentiates through θ₀ = φ and every unrolled step. Where `meta`
  is the only ITD level above `adapt`, `adapt`'s real steps record that graph as they go
  (`mlo.live`), so the meta-gradient costs one backward pass and no replay.
- **FOMAML**: `hypergrad="first_order"` on `meta` takes dθ_T/dφ = I, so φ moves along the query
  gradient at θ_T, without any replay. `mlo.hypergrad.itd(first_order=True)` differentiates
  the steps with their gradients held constant (recorded as they are taken, as for MAML): the
  same for plain SGD, and it also differentiates learned learning rates to first order.
- **iMAML**: `adapt`'s cost adds the proximal term λ/2‖θ − φ‖², reading φ as `meta.params`;
  `meta` declares `aid_cg` / `aid_neumann`. Implicit methods differentiate the solution of that
  cost, so they ignore the start (without a proximal term their hypergradient is zero).
- **Reptile**: `meta` declares no hypergrad and its cost pulls φ towards the adapted θ_T::

      def meta(module, adapt):  # SGD with lr ε on it gives φ ← φ + ε(θ_T − φ)
          return sum(0.5 * ((p - q.detach()) ** 2).sum()
                     for p, q in zip(module.params.values(), adapt.params.values()))

- **Meta-SGD / learned inner learning rates**: a level whose module holds 0-dim tensors (one, or
  one per parameter tensor of the learner) is the `lr` of the lower level's optimizer param
  groups; the lower level names it in its signature and it declares `hypergrad="itd"`::

      rates = nn.ParameterList(nn.Parameter(torch.tensor(0.01)) for _ in learner.parameters())
      inner_opt = torch.optim.SGD([{"params": [p], "lr": r}
                                   for p, r in zip(learner.parameters(), rates)])

      @mlo.level(module=learner, optimizer=inner_opt, data=support, unroll=5)
      def adapt(batch, module, meta: mlo.Init, inner_lr): ...

      @mlo.level(module=rates, optimizer=torch.optim.Adam(rates.parameters(), 1e-3),
                 data=query, hypergrad="itd")
      def inner_lr(batch, adapt): ...

  Real steps use the rate's current value (recorded by value at each step); ITD differentiates
  them with the rate as a variable (in the recorded graph, or in a replay), so d(query
  loss)/d(rate) flows through every update. Only `itd`
  differentiates an update rule, so only an `itd` level named by the lower level may own such a
  tensor (any tensor hyperparameter of a param group works alike, where torch.optim accepts
  one). Hypergradient descent on a learning rate is the same program without `mlo.Init`.

Resets: before `adapt`'s first step, and before its first step after each step (each task) of
`meta`, its parameters are copied from `meta`'s and its optimizer state (momentum, Adam moments
and step count) is cleared; its scheduler and loss scaler continue. `warmup` cannot be set on a
level that starts from another: every window restarts from φ, and a longer first window would
be differentiated from a start that is not φ.

Meta-batches: `tasks=T` on `meta` makes each of its optimizer steps average T tasks. Each task is
one window: `adapt` is reset, takes `unroll` steps on its next `unroll` batches, and `meta`
evaluates its cost on its next batch and adds 1/T of its gradient; after the T-th task `meta`
steps once. Data contract: `adapt`'s data yields the support batches task after task (`unroll`
per task, repeat a batch to take several steps on it) and `meta`'s data the query batch of each
task in the same order (`grad_accum` query batches per task where `meta` sets it). A meta step
takes T·unroll global steps; the levels above see one step. Tasks run one after another, as a
hand-written MAML loop runs them: memory stays that of one task, and any module, optimizer and
cost works unchanged. With `tasks=T, vmap=True` they run side by side instead, along a leading
task axis of every batch, vectorised with `torch.func.vmap` (`mlo.task_axis`: MAML and FOMAML
with `itd`; the learner's parameters and optimizer state get the task axis and its optimizer's
functional mirror applies the steps): one meta step takes `unroll` global steps, and the
memory of all T tasks is held at once.
"""

from __future__ import annotations

import torch

from .errors import GraphError


def check_starts(levels: dict, graph) -> dict[str, str]:
    """Return {lower: upper} of the program's Init edges, or raise a `GraphError`."""
    starts = {}
    for upper, lower in graph.init:
        where = levels[lower].location
        if lower not in graph.reads(upper):
            raise GraphError(
                f"Program: level '{lower}' starts from '{upper}' (mlo.Init), but '{upper}' does "
                f"not read '{lower}''s solution, so '{lower}' has no unroll window to start.\n"
                f"  {where}\n  Name '{lower}' in the signature of '{upper}'.")
        if levels[lower].options.warmup:
            raise GraphError(
                f"Program: level '{lower}' starts each unroll window from '{upper}' (mlo.Init), "
                f"so it cannot take warmup={levels[lower].options.warmup} steps before its "
                f"first window.\n  {where}\n  Remove warmup=... from '{lower}'.")
        mismatch = _first_mismatch(levels[lower].named_parameters(),
                                   levels[upper].named_parameters(), lower, upper)
        if mismatch:
            raise GraphError(
                f"Program: level '{lower}' starts from '{upper}' (mlo.Init), but their "
                f"parameters differ: {mismatch}.\n  {where}\n  Give both levels the same "
                f"architecture, e.g. copy.deepcopy(module) of one for the other.")
        starts[lower] = upper
    return starts


def _first_mismatch(ours: dict, theirs: dict, lower: str, upper: str) -> str | None:
    for key, t in ours.items():
        if key not in theirs:
            return f"'{lower}' has parameter '{key}', '{upper}' has none of that name"
        if t.shape != theirs[key].shape:
            return (f"parameter '{key}' has shape {tuple(t.shape)} in '{lower}' and "
                    f"{tuple(theirs[key].shape)} in '{upper}'")
    for key in theirs:
        if key not in ours:
            return f"'{upper}' has parameter '{key}', '{lower}' has none of that name"
    return None


def learned_hyperparameters(levels: dict, graph) -> dict[str, dict]:
    """Find optimizer hyperparameters that are an upper level's tensors.

    Returns {lower: {(parameter name, hyperparameter): (upper, upper's parameter name)}} and
    raises a `GraphError` unless that upper level is named by the lower one, above it, and
    declares `itd`, the one method that differentiates the update rule.
    """
    owners = {id(t): (name, key) for name, lv in levels.items()
              for key, t in lv.named_parameters().items()}
    learned: dict[str, dict] = {}
    for name, level in levels.items():
        names = {id(p): key for key, p in level.named_parameters().items()}
        for group in level.optimizer.param_groups:
            for hyper, value in group.items():
                if hyper == "params" or id(value) not in owners:
                    continue
                source = owners[id(value)]
                _check_source(levels, graph, name, hyper, source)
                for p in group["params"]:
                    learned.setdefault(name, {})[(names[id(p)], hyper)] = source
    return learned


def relink(levels: dict, learned: dict) -> None:
    """Point each learned hyperparameter back at its owner's tensor.

    Loading a torch optimizer's state dict replaces a tensor `lr` in its param groups by the
    saved copy; the owner's own tensor (restored with its module) must drive the steps again.
    """
    for name, entries in learned.items():
        level = levels[name]
        groups = {id(p): group for group in level.optimizer.param_groups for p in group["params"]}
        params = level.named_parameters()
        for (key, hyper), (upper, source) in entries.items():
            groups[id(params[key])][hyper] = levels[upper].named_parameters()[source]


def _check_source(levels: dict, graph, name: str, hyper: str, source: tuple) -> None:
    upper, key = source
    prefix = (f"Program: level '{name}''s optimizer has {hyper}= parameter '{key}' of level "
              f"'{upper}'")
    if (upper, name) not in graph.u2l + graph.init:
        raise GraphError(
            f"{prefix}, but '{upper}' is not an upper level named by '{name}'.\n  "
            f"{levels[name].location}\n  Name '{upper}' in '{name}''s signature and declare "
            f"hypergrad='itd' on '{upper}', or give the optimizer a plain number.")
    method = levels[upper].method
    if method is None or method.name != "itd":
        raise GraphError(
            f"{prefix}, which declares hypergrad={method!r}; only itd differentiates an update "
            f"rule.\n  {levels[upper].location}\n  Declare hypergrad='itd' on '{upper}'.")


def check_tasks(levels: dict, graph, edges: dict) -> None:
    """Refuse `tasks=T > 1` where a meta-batch has no meaning or cannot be differentiated."""
    for name, level in levels.items():
        if level.options.tasks == 1:
            continue
        if not graph.reads(name):
            raise GraphError(
                f"Program: level '{name}' has tasks={level.options.tasks}, but it reads no "
                f"level's solution, so it has no task windows.\n  {level.location}\n  Use "
                f"grad_accum={level.options.tasks} to average several batches per step.")
        for upper, through in edges.items():
            if name in through and levels[upper].method.name == "itd":
                raise GraphError(
                    f"Program: level '{upper}' (itd) replays the steps of '{name}', which has "
                    f"tasks={level.options.tasks}; a replay cannot re-adapt each task.\n  "
                    f"{levels[upper].location}\n  Use an implicit method (aid_cg, aid_neumann) "
                    f"on '{upper}', or tasks=1 on '{name}'.")


def reset(level, upper) -> None:
    """Set `level`'s parameters to `upper`'s (θ₀ = φ) and clear its optimizer state."""
    source = upper.named_parameters()
    with torch.no_grad():
        for key, p in level.named_parameters().items():
            p.copy_(source[key])
    level.optimizer.state.clear()


class MetaBatch:
    """The tasks of an upper level's current meta-batch: their micro-batches, losses, finiteness.

    The gradient itself accumulates in the level's `.grad` (each task adds 1/T of its own).
    """

    def __init__(self, tasks: int):
        self.tasks, self.done = tasks, 0
        self.batches: list = []
        self.losses: list = []
        self.finite = True

    def add(self, micro_batches: list, losses: list, finite: bool) -> bool:
        """Record one task; return whether it completes the meta-batch."""
        self.batches += micro_batches
        self.losses += losses
        self.finite &= finite
        self.done += 1
        return self.done == self.tasks

    def take(self) -> tuple[list, list, bool]:
        """Return every task's micro-batches, losses and finiteness, and start a new meta-batch."""
        out = (self.batches, self.losses, self.finite)
        self.__init__(self.tasks)
        return out

    def state_dict(self, level) -> dict:
        grads = {k: p.grad for k, p in level.named_parameters().items() if p.grad is not None}
        return {"done": self.done, "batches": self.batches, "losses": self.losses,
                "finite": self.finite, "grads": grads if self.done else {}}

    def load_state_dict(self, state: dict, level) -> None:
        self.done, self.finite = state["done"], state["finite"]
        self.batches, self.losses = list(state["batches"]), list(state["losses"])
        for key, p in level.named_parameters().items():
            p.grad = state["grads"].get(key)
