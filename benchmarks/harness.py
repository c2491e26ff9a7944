"""Run implementations of one multilevel program side by side: time, peak memory, loss, agreement.

A *program* is a package under `benchmarks/` (e.g. `benchmarks.reweight`) exposing

    TITLE: str                      heading of its results file
    IMPLEMENTATIONS: tuple[str]     module names of its implementations, hand-written first
    NOTES: list[str]                markdown notes printed under its tables
    cases(quick: bool) -> list[Case]

and an *implementation* is a module of that package exposing

    UNSUPPORTED: dict[str, str]     method -> why this implementation cannot run it
    make(config) -> runner          runner.step(): one outer step (the lower levels' unrolled
                                    steps and one upper update); runner.loss() -> float: the
                                    program's evaluation loss at the current parameters;
                                    runner.outer_params() -> list[Tensor] in a fixed order.

Timing protocol: every implementation is built from the same initial parameters and data, takes
`warmup` outer steps, then `reps` timed outer steps interleaved A B C, B C A, ... in one process,
so machine noise (thermal state, other processes) hits all of them alike. Cases that differ only
in their method (e.g. aid_fd and aid_fd_central at the same size and unroll) are measured in one
such rotation, every (method, implementation) pair interleaved with every other. Memory is measured on
`MEMORY_STEPS` further (untimed) steps, because measuring it perturbs time: the peak resident set
size during one outer step above the resident size just before it (Linux: freed heap is returned
to the system with malloc_trim and the kernel's high-water mark is reset through
/proc/self/clear_refs first, so the step's fresh pages are counted — and page-faulted, which is why
those steps are not timed), or the peak of torch.cuda.memory_allocated above the allocated memory
before the step on a GPU. Every implementation takes the same number of steps, so the final losses
compare equal work.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import os
import platform
import statistics
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


MEMORY_STEPS = 2  # extra outer steps per implementation, after the timed ones, to measure memory


@dataclass
class Case:
    """One (program, method, size) combination to measure."""

    label: str                   # row group in the table, e.g. "mlp 784-256-10, aid_fd, unroll 1"
    method: str                  # aid_fd | aid_fd_central | aid_cg | aid_neumann | itd
    config: Any                  # the program's config dataclass
    warmup: int = 2
    reps: int = 10


@dataclass
class Row:
    """One implementation's measurements for one case."""

    case: str
    method: str
    impl: str
    status: str = "ok"           # ok | unsupported | unavailable | error
    reason: str = ""
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)   # process CPU time of the same steps
    mem_mb: list[float] = field(default_factory=list)
    loss: float = float("nan")
    diff_abs: float = float("nan")   # max |hypergrad_impl - hypergrad_handwritten|
    diff_rel: float = float("nan")   # the same, over max |hypergrad_handwritten|

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.times_ms) < 2:
            return (self.median, self.median)
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return (q[0], q[2])

    @property
    def peak_mb(self) -> float:
        return max(self.mem_mb) if self.mem_mb else float("nan")


# ----------------------------------------------------------------------------------------- memory

_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:  # not glibc: the baseline then includes freed-but-cached heap
        pass


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory above the level at `start()`, in MiB: RSS on CPU, the allocator on CUDA.

    On Linux the kernel's RSS high-water mark is exact; elsewhere a psutil thread samples the RSS
    every millisecond (it can miss peaks shorter than that).
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.linux = os.path.exists("/proc/self/clear_refs")
        self.base = 0
        self._sampler = None

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.linux:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024
        else:
            self._sampler = _RssSampler()

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self.linux:
            return max(0, _status_kb("VmHWM") * 1024 - self.base) / 2**20
        return self._sampler.stop() / 2**20 if self._sampler else float("nan")


class _RssSampler:
    def __init__(self):
        import threading

        import psutil
        self.process, self.done = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(0, max(self.peak, self.process.memory_info().rss) - self.base)


class LiveBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created by operators and still alive; keep the peak.

    Exact for tensors (not allocator caches or fragmentation); storages alive before the mode
    starts (parameters, data) are not counted, except the `held` storages: those count as live
    from the start until they are freed (a gradient set to None and made again during the
    measured step is then counted once). An operator whose schema says it returns an alias
    of an input (a view, `detach`, an in-place or `out=` operator, a collective) creates no
    storage, so its outputs are not counted: otherwise a view or in-place update of a parameter
    would count the parameter's storage as new."""

    def __init__(self, held=()):
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()
        for storage in held:
            self._seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, storage.data_ptr(), storage.nbytes())
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        if schema is not None and any(r.alias_info is not None for r in schema.returns):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                except RuntimeError:  # a wrapper subclass (DTensor, a collective's result) has
                    continue  # no storage of its own: the plain tensor inside it is counted
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- machine

def machine(device: str = "cpu") -> dict[str, str]:
    """Describe the machine and software the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "load average at start": "%.2f" % os.getloadavg()[0],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name, module in (("betty", "betty"), ("torchopt", "torchopt"), ("higher", "higher")):
        info[name] = _version(module)
    try:
        import psutil
        info["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    return info


def _version(module: str) -> str:
    from importlib import metadata
    dist = {"betty": "betty-ml"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------- running

def load(program: str, impl: str):
    """Import `benchmarks.<program>.<impl>`; return (module, None) or (None, why it failed)."""
    try:
        return importlib.import_module(f"benchmarks.{program}.{impl}"), None
    except Exception as exc:  # a peer library that is missing or broken: report, do not abort
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def measure(program, name: str, cases: list[Case], impls: list[str], check: bool = True,
            log=print) -> list[Row]:
    """Measure every implementation in `impls` on every case of `cases`, all interleaved.

    The cases of one call differ only in their method (same sizes, same warm-up and repetitions:
    those of the first case), so method ratios are measured as fairly as implementation ratios.
    The first implementation is each case's reference for the agreement check.
    """
    rows, runners = [], {}
    device = getattr(cases[0].config, "device", "cpu")
    for case in cases:
        for impl in impls:
            row = Row(case.label, case.method, impl)
            rows.append(row)
            runner = _make(name, impl, case, row, log)
            if runner is not None:
                runners[id(row)] = runner
    live = [r for r in rows if id(r) in runners]

    for _ in range(cases[0].warmup):
        for row in live:
            _guarded(row, runners, lambda r: r.step())
    live = [r for r in live if r.status == "ok"]

    memory = PeakMemory(device)
    for rep in range(cases[0].reps + MEMORY_STEPS):
        # rotate the order so no implementation always runs right after the same other one
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        timed = rep < cases[0].reps
        for row in order:
            if row.status != "ok":
                continue
            if not timed:
                memory.start()
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            ok = _guarded(row, runners, lambda r: r.step())
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1e3
            if ok and timed:
                row.times_ms.append(elapsed)
                row.cpu_ms.append((time.process_time() - cpu_start) * 1e3)
            elif ok:
                row.mem_mb.append(memory.stop())
    for row in live:
        if row.status == "ok":
            _guarded(row, runners, lambda r: setattr(row, "loss", float(r.loss())))
    runners.clear()
    gc.collect()

    if check:
        for case in cases:
            agreement(program, case, [r for r in rows if r.case == case.label], log)
    return rows


def _make(name: str, impl: str, case: Case, row: Row, log):
    """Build `impl`'s runner for `case`, or record on `row` why there is none."""
    module, why = load(name, impl)
    if module is None:
        row.status, row.reason = "unavailable", why
        return None
    if case.method in module.UNSUPPORTED:
        row.status, row.reason = "unsupported", module.UNSUPPORTED[case.method]
        return None
    try:
        runner = module.make(case.config)
        row.reason = getattr(runner, "note", "")
        return runner
    except Exception as exc:
        row.status, row.reason = "error", _why(exc)
        log(f"    {impl}: make failed: {row.reason}")
        return None


def agreement(program, case: Case, rows: list[Row], log=print) -> None:
    """Compare one outer step's hypergradient of every implementation with the reference's.

    Each implementation is rebuilt from the same initial parameters and takes one outer step; a
    global optimizer step pre-hook records the gradient its upper-level optimizer is about to
    apply (the hypergradient). Reading the gradient, not the parameter change, keeps float32
    rounding of the parameters and Adam's normalisation of the first step out of the comparison.
    """
    grads = {}
    for row in rows:
        if row.status != "ok":
            continue
        module, _ = load(program.__name__.rsplit(".", 1)[-1], row.impl)
        try:
            grads[row.impl] = _one_hypergradient(module.make(case.config))
        except Exception as exc:
            log(f"    {row.impl}: agreement check failed: {_why(exc)}")
    reference = rows[0].impl
    if reference not in grads:
        return
    ref = grads[reference]
    scale = ref.abs().max().item()
    for row in rows:
        if row.impl in grads:
            diff = (grads[row.impl] - ref).abs().max().item()
            row.diff_abs = diff
            row.diff_rel = diff / scale if scale > 0 else float("nan")


def _one_hypergradient(runner) -> torch.Tensor:
    params = list(runner.outer_params())
    watch = {id(p) for p in params}
    seen: dict[int, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in watch and p.grad is not None:
                    seen[id(p)] = p.grad.detach().clone()

    handle = register_optimizer_step_pre_hook(hook)
    try:
        runner.step()
    finally:
        handle.remove()
    missing = [p for p in params if id(p) not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} upper-level parameter(s) were not stepped by a "
                           f"torch.optim optimizer with a gradient")
    return torch.cat([seen[id(p)].flatten().double() for p in params])


def _guarded(row: Row, runners: dict, fn) -> bool:
    try:
        fn(runners[id(row)])
        return True
    except Exception as exc:
        row.status, row.reason = "error", _why(exc)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return False


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:240]


def replace(config, **changes):
    """`dataclasses.replace` for the programs' frozen configs."""
    return dataclasses.replace(config, **changes)
