"""Write measured rows as a markdown table and a CSV file under benchmarks/results/."""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import OrderedDict

from .harness import Row

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


COLUMNS = (
    "Columns: ms per outer step (median and interquartile range over the timed steps, "
    "implementations interleaved in one process after warm-up); ×hand = median over the "
    "hand-written median; peak MiB = largest per-step peak memory above the memory held before "
    "the step; loss = evaluation loss after all steps (equal work gives equal losses up to float "
    "rounding); Δ hypergrad = max abs difference of one outer step's hypergradient from the "
    "hand-written one (absolute, and relative to its largest entry).")


def _fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _sci(x: float) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.1e}"


def markdown(title: str, info: dict, command: str, rows: list[Row], notes: list[str],
             extra: str = "", per_case: bool = True) -> str:
    """Render one program's rows: one table per case, the reference implementation first."""
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    if per_case:
        lines += [COLUMNS, ""]
    groups: OrderedDict[str, list[Row]] = OrderedDict()
    for row in rows:
        groups.setdefault(row.case, []).append(row)
    for case, group in groups.items() if per_case else ():
        lines += [f"## {case}", ""]
        lines += ["| implementation | ms/step (median) | IQR | ×hand | peak MiB | loss | "
                  "Δ hypergrad abs | Δ rel | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        ref = next((r.median for r in group if r.status == "ok"), float("nan"))
        for r in group:
            if r.status == "ok":
                q1, q3 = r.iqr
                ratio = r.median / ref if ref and not math.isnan(ref) else float("nan")
                lines.append(f"| {r.impl} | {_fmt(r.median)} | {_fmt(q1)}–{_fmt(q3)} | "
                             f"{_fmt(ratio, 2)} | {_fmt(r.peak_mb, 2)} | {_fmt(r.loss, 4)} | "
                             f"{_sci(r.diff_abs)} | {_sci(r.diff_rel)} | {r.reason} |")
            else:
                lines.append(f"| {r.impl} | {r.status} | | | | | | | "
                             f"{r.reason.replace('|', '/')} |")
        lines.append("")
    if extra:
        lines += [extra, ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def method_ratios(rows: list[Row], method: str, baseline: str) -> str:
    """A markdown table of `method` over `baseline` per case and implementation: time and peak
    memory ratios, pairing the cases whose labels differ only in the method's name.

    Three time ratios: of the medians of wall-clock time; the median of the ratios of the steps
    taken in the same rotation (the harness interleaves them, so slow spells of a shared machine
    cancel); and of the medians of process CPU time, which excludes time spent descheduled.
    """
    def key(r: Row):
        return tuple("·" if part == r.method else part for part in r.case.split(", ")), r.impl

    ok = [r for r in rows if r.status == "ok"]
    base = {key(r): r for r in ok if r.method == baseline}
    pairs = [(r, base[key(r)]) for r in ok if r.method == method and key(r) in base]
    lines = [f"## {method} against {baseline}", "",
             f"Each row compares one implementation's {method} case with its {baseline} case "
             "that differs only in the method (measured interleaved in this run); ratios are "
             f"{method} / {baseline}: of median wall-clock ms, median of the per-rotation ratios "
             "(paired), of median process CPU ms, and of peak memory.", "",
             f"| case | implementation | {method} ms | {baseline} ms | time ratio | paired | "
             f"CPU-time ratio | {method} peak MiB | {baseline} peak MiB | peak memory ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, b in pairs:
        paired = [x / y for x, y in zip(r.times_ms, b.times_ms)]
        cells = [r.median, b.median, r.median / b.median,
                 statistics.median(paired) if paired else float("nan"),
                 r.cpu_median / b.cpu_median]
        memory = r.peak_mb / b.peak_mb if b.peak_mb else float("nan")
        lines.append(f"| {r.case.replace(f', {method}', '')} | {r.impl} | {_fmt(cells[0])} | "
                     f"{_fmt(cells[1])} | " + " | ".join(_fmt(c, 2) for c in cells[2:])
                     + f" | {_fmt(r.peak_mb, 2)} | {_fmt(b.peak_mb, 2)} | {_fmt(memory, 2)} |")
    return "\n".join(lines) if pairs else ""


def write(name: str, title: str, info: dict, command: str, rows: list[Row], notes: list[str],
          extra: str = "", per_case: bool = True) -> tuple[str, str]:
    """Write results/<name>.md and results/<name>.csv; return their paths."""
    os.makedirs(RESULTS, exist_ok=True)
    md_path = os.path.join(RESULTS, f"{name}.md")
    csv_path = os.path.join(RESULTS, f"{name}.csv")
    with open(md_path, "w") as f:
        f.write(markdown(title, info, command, rows, notes, extra, per_case))
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "method", "implementation", "status", "ms_median", "ms_q1",
                         "ms_q3", "steps_timed", "cpu_ms_median", "peak_mib", "loss",
                         "hypergrad_diff_abs", "hypergrad_diff_rel", "note"]
                        + [f"machine_{k}" for k in info])
        for r in rows:
            q1, q3 = r.iqr
            writer.writerow([r.case, r.method, r.impl, r.status, f"{r.median:.3f}", f"{q1:.3f}",
                             f"{q3:.3f}", len(r.times_ms), f"{r.cpu_median:.3f}",
                             f"{r.peak_mb:.2f}", f"{r.loss:.6g}", f"{r.diff_abs:.3g}",
                             f"{r.diff_rel:.3g}", r.reason]
                            + list(info.values()))
    return md_path, csv_path
