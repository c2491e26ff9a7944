"""Run implementations of one multilevel program side by side: time, peak memory, loss, agreement.

A *program* is a package under `benchmarks/` (e.g. `benchmarks.reweight`) exposing

    TITLE: str                      heading of its results file
    IMPLEMENTATIONS: tuple[str]     module names of its implementations, hand-written first
    NOTES: list[str]                markdown notes printed under its tables
    cases(quick: bool) -> list[Case]
    check_config(config) -> config  the same config with a plain-SGD outer step (see `agreement`)

and an *implementation* is a module of that package exposing

    UNSUPPORTED: dict[str, str]     method -> why this implementation cannot run it
    make(config) -> runner          runner.step(): one outer step (the lower levels' unrolled
                                    steps and one upper update); runner.loss() -> float: the
                                    program's evaluation loss at the current parameters;
                                    runner.outer_params() -> list[Tensor] in a fixed order.

Timing protocol: every implementation is built from the same initial parameters and data, takes
`warmup` outer steps, then `reps` timed outer steps interleaved A B C A B C ... in one process, so
machine noise (thermal state, other processes) hits all of them alike. Memory is the peak resident
set size during one outer step above the resident size just before it (Linux: the kernel's high
water mark is reset through /proc/self/clear_refs and freed heap is returned with malloc_trim first),
or the peak of torch.cuda.memory_allocated above the allocated memory before the step on a GPU.
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
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Case:
    """One (program, method, size) combination to measure."""

    label: str                   # row group in the table, e.g. "mlp 784-256-10, aid_fd, unroll 1"
    method: str                  # aid_fd | aid_cg | aid_neumann | itd
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
    mem_mb: list[float] = field(default_factory=list)
    loss: float = float("nan")
    diff_abs: float = float("nan")   # max |hypergrad_impl - hypergrad_handwritten|
    diff_rel: float = float("nan")   # the same, over max |hypergrad_handwritten|

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

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
    """Peak memory above the level at `start()`, in MiB, on CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0
        self.linux = os.path.exists("/proc/self/clear_refs")
        if not self.cuda and not self.linux:
            import psutil  # noqa: F401  (fallback below samples nothing; reported as nan)

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

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self.linux:
            return max(0, _status_kb("VmHWM") * 1024 - self.base) / 2**20
        return float("nan")


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


def measure(program, name: str, case: Case, impls: list[str], check: bool = True,
            log=print) -> list[Row]:
    """Measure every implementation in `impls` on `case`; the first one is the reference."""
    rows, runners = [], {}
    device = getattr(case.config, "device", "cpu")
    for impl in impls:
        row = Row(case.label, case.method, impl)
        rows.append(row)
        module, why = load(name, impl)
        if module is None:
            row.status, row.reason = "unavailable", why
            continue
        if case.method in module.UNSUPPORTED:
            row.status, row.reason = "unsupported", module.UNSUPPORTED[case.method]
            continue
        try:
            runners[impl] = module.make(case.config)
        except Exception as exc:
            row.status, row.reason = "error", _why(exc)
            log(f"    {impl}: make failed: {row.reason}")
    live = [r for r in rows if r.impl in runners]

    for _ in range(case.warmup):
        for row in live:
            _guarded(row, runners, lambda r: r.step())
    live = [r for r in live if r.status == "ok"]

    memory = PeakMemory(device)
    for rep in range(case.reps):
        # rotate the order so no implementation always runs right after the same other one
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for row in order:
            if row.status != "ok":
                continue
            runner = runners[row.impl]
            memory.start()
            _sync(device)
            start = time.perf_counter()
            ok = _guarded(row, runners, lambda r: r.step())
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1e3
            peak = memory.stop()
            if ok:
                row.times_ms.append(elapsed)
                row.mem_mb.append(peak)
    for row in live:
        if row.status == "ok":
            _guarded(row, runners, lambda r: setattr(row, "loss", float(r.loss())))
    runners.clear()
    gc.collect()

    if check:
        agreement(program, case, rows, log)
    return rows


def agreement(program, case: Case, rows: list[Row], log=print) -> None:
    """Compare one outer step's hypergradient of every implementation with the reference's.

    Each implementation is rebuilt from the same initial parameters with a plain-SGD outer
    optimizer of learning rate 1 (`program.check_config`), so the change of the outer parameters
    over one step is minus the hypergradient, and differences are not hidden by Adam's
    normalisation of the first step.
    """
    config = program.check_config(case.config)
    grads = {}
    for row in rows:
        if row.status != "ok":
            continue
        module, _ = load(program.__name__.rsplit(".", 1)[-1], row.impl)
        try:
            runner = module.make(config)
            before = [p.detach().clone() for p in runner.outer_params()]
            runner.step()
            grads[row.impl] = torch.cat([(b - a.detach()).flatten().double()
                                         for b, a in zip(before, runner.outer_params())])
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


def _guarded(row: Row, runners: dict, fn) -> bool:
    try:
        fn(runners[row.impl])
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
