"""Task-vectorised meta-batches: `tasks=T, vmap=True` runs the T tasks of a meta-batch at once.

With `@mlo.level(..., hypergrad="itd", tasks=T, vmap=True)` on the meta level, the T tasks of a
meta-batch are not taken one after another (`mlo.meta`) but side by side, along a leading task
axis, with `torch.func.vmap`:

- **Data contract.** Every batch of the learner (the level that starts from the meta level by
  `mlo.Init`) and of the meta level holds the T tasks' batches stacked along a leading axis of
  size T: task i's support batch (or query batch) at index i of every tensor in it. A meta step
  takes `unroll` global steps (one learner step of every task per global step), not T·unroll.
- **Learner.** Its window starts from θ₀ = φ broadcast over the tasks (a view: the meta-gradient
  sums the tasks' paths into φ). Each real step evaluates the learner's cost once per task under
  `vmap`, differentiates the sum of the T losses (so each task's parameters receive their own
  gradient) and applies the functional mirror of the learner's optimizer (`mlo.optim`: SGD with
  momentum, Adam, AdamW; learning rates and other hyperparameters read from its param groups at
  each step) to the task-axis parameters and optimizer state, recording the second-order graph
  (`mlo.live`). A `torch.optim` optimizer has no task axis, so here the mirror is the update:
  the learner's module and torch optimizer are not stepped; the module holds φ (it is reset to
  it at each window) and its optimizer state stays empty. The logged loss is the tasks' mean.
- **Meta level.** Its cost runs once per task under `vmap`, on that task's adapted parameters
  and query batch; the meta-gradient is that of the tasks' mean loss, one backward pass through
  all T adaptations: the same quantity as `tasks=T` without `vmap` (tested to 1e-10 against
  it and against hand-written MAML), in one optimizer step.

Random draws in the costs (dropout) differ between tasks (`randomness="different"`) and are
recorded and replayed as in any live window; checkpoints inside a window resume exactly.

Cost: one vectorised step instead of T small ones: on CPU, MAML on sinusoids with a meta-batch
of 25 ran several times faster than the sequential loop (`python -m benchmarks --programs
metalearn`). Memory: the T tasks' graphs are held together (the sequential loop holds one).

Where it applies: the meta level declares `itd` (`mlo.hypergrad.itd(first_order=True)` for
FOMAML) and every level it reads starts from it by `mlo.Init`, is read by it alone and records
its window live (no fp16/bf16, gradient accumulation, activation checkpointing, data
parallelism or gradient clipping on the learner); the learner's module has no buffers (a
running statistic cannot advance per task in place). Anything else is refused with a
`GraphError` when the `Program` is built.
"""

from __future__ import annotations

import torch

from .errors import GraphError, LevelError


def vmapped_levels(program) -> dict[str, int]:
    """{learner: T} for the levels whose parameters carry a task axis: those read by a meta level
    declared `vmap=True`; raises `GraphError` where such a program cannot run on a task axis
    (see the module docstring)."""
    axis = {}
    for name, level in program.levels.items():
        if not level.options.vmap:
            continue
        tasks, where = level.options.tasks, f"\n  {level.location}"
        method = level.method
        if method is None or method.name != "itd" or method.option("recompute"):
            raise GraphError(
                f"Program: level '{name}' has vmap=True, which needs hypergrad='itd' (or "
                f"mlo.hypergrad.itd(first_order=True) for first-order MAML); it has "
                f"hypergrad={method!r}.{where}\n  Declare hypergrad='itd', or drop vmap=True to "
                f"take the tasks one after another.")
        for lower in program.graph.reads(name):
            _check_learner(program, name, lower, tasks)
            axis[lower] = tasks
    return axis


def _check_learner(program, upper: str, lower: str, tasks: int) -> None:
    level = program.levels[lower]
    prefix = f"Program: level '{upper}' has vmap=True and reads '{lower}'"
    where = f"\n  {level.location}"
    if program._starts.get(lower) != upper:
        raise GraphError(f"{prefix}, which does not start from it; a task axis needs each task "
                         f"to start from '{upper}'.{where}\n  Annotate the argument "
                         f"'{upper}: mlo.Init' in '{lower}'s signature.")
    if program._live.get(lower) != (upper,) or upper not in program._live_uppers:
        raise GraphError(f"{prefix}, whose steps cannot be recorded as they are taken (fp16/bf16, "
                         f"gradient accumulation, activation checkpointing, data parallelism, "
                         f"another level differentiating them, or a hypergradient of its "
                         f"own).{where}\n  Remove those options from '{lower}', or drop "
                         f"vmap=True on '{upper}'.")
    readers = [n for n in program.levels if n != upper and lower in program.graph.reads(n)]
    if readers:
        raise GraphError(f"{prefix}, which '{readers[0]}' reads too; its T adapted parameter sets "
                         f"exist only inside '{upper}'s meta step.{where}\n  Read '{lower}' from "
                         f"'{upper}' only, or drop vmap=True.")
    if level.options.clip_grad is not None:
        raise GraphError(f"{prefix}, which clips its gradient by the norm over all parameters, "
                         f"which would mix the tasks.{where}\n  Remove clip_grad from "
                         f"'{lower}', or drop vmap=True.")
    module = level.module
    if isinstance(module, torch.nn.Module) and any(True for _ in module.buffers()):
        name = next(n for n, _ in module.named_buffers())
        raise GraphError(f"{prefix}, whose module has buffers ('{name}'); a running statistic "
                         f"cannot advance per task.{where}\n  Use a module without buffers (e.g. "
                         f"LayerNorm or GroupNorm for BatchNorm), or drop vmap=True.")


def broadcast(params: dict, tasks: int) -> dict:
    """θ₀ for every task: each tensor viewed with a leading task axis of size `tasks`."""
    return {k: t.expand(tasks, *t.shape) for k, t in params.items()}


def task_costs(program, level, batch, params: dict, tasks: int, real: bool = True):
    """Run `level`'s cost for each of the `tasks` tasks under `torch.func.vmap`; return (the T
    losses, the metrics averaged over tasks). `params` by level name, as for `_cost`: the
    learners' (`program._task_axis`) carry a leading task axis, the others are shared by every
    task; `batch` stacks the tasks' batches along its leading axis."""
    _check_batch(level, batch, tasks)
    stacked = {n: v for n, v in params.items() if n in program._task_axis}
    shared = {n: v for n, v in params.items() if n not in program._task_axis}

    def one(task_params, task_batch):
        out = program._cost_output(level, task_batch, {**shared, **task_params}, real=real)
        metrics = {}
        if isinstance(out, dict):
            metrics = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in out.items()
                       if k != "loss"}
        loss, _ = program._loss_of(level, out, metrics=False)
        return loss, metrics

    losses, metrics = torch.func.vmap(one, randomness="different")(stacked, batch)
    return losses, {k: float(v.detach().mean()) for k, v in metrics.items()}


def _check_batch(level, batch, tasks: int) -> None:
    sizes = [t.shape[0] if t.dim() else None for t in _tensors(batch, level)]
    if not sizes or any(size != tasks for size in sizes):
        got = "no tensor" if not sizes else f"leading sizes {sizes}"
        raise LevelError(f"level '{level.name}' runs {tasks} tasks side by side (vmap=True): "
                         f"every tensor of its batch must hold the tasks along a leading axis "
                         f"of size {tasks} (task i at index i), got {got}. Stack the tasks' "
                         f"batches with torch.stack.")


def _tensors(tree, level) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item, level)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item, level)]
    raise LevelError(f"level '{level.name}' runs its tasks side by side (vmap=True), but its "
                     f"batch holds a {type(tree).__name__}; only tensors (in tuples, lists and "
                     f"dicts) can be split along the task axis.")
