"""program.history: bounded columns that read as a list of dicts."""

import math

import pytest
import torch

from mlo.history import History, Series


def filled(count, limit):
    series = Series(limit)
    for step in range(1, count + 1):
        series.append({"step": step, "loss": step / 10, "acc": float(step % 7)})
    return series


def test_reads_as_a_list_of_dicts_until_the_limit():
    series = filled(5, limit=8)
    assert series == [{"step": s, "loss": s / 10, "acc": float(s % 7)} for s in range(1, 6)]
    assert series[-1]["loss"] == 0.5 and series[1:3] == [series[1], series[2]]
    assert series.column("step") == [1, 2, 3, 4, 5] and series.count == 5
    with pytest.raises(IndexError, match=r"history index 5 out of range \(5 entries held\)"):
        series[5]


def test_memory_is_bounded_and_the_newest_half_stays_exact():
    series = filled(10_000, limit=64)
    steps = series.column("step")
    assert len(series) < 64 and series.count == 10_000
    assert steps[-32:] == list(range(10_000 - 31, 10_001))  # the newest limit/2: every step
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 1  # older: sparser with age
    assert all(entry["loss"] == entry["step"] / 10 for entry in series)  # rows stay aligned


def test_a_metric_that_appears_later_reads_nan_before():
    series = Series()
    series.append({"step": 1, "loss": 1.0})
    series.append({"step": 2, "loss": 0.5, "acc": 0.75})
    assert math.isnan(series[0]["acc"]) and series[1] == {"step": 2, "loss": 0.5, "acc": 0.75}


def test_state_round_trip_is_exact():
    history = History(["inner"], limit=16)
    for step in range(1, 40):
        history["inner"].append({"step": step, "loss": 1 / step})
    history.series("validate").append({"step": 10, "score": 0.25})
    state = history.state_dict()
    assert all(isinstance(c, torch.Tensor) for c in state["series"]["inner"]["columns"].values())
    restored = History.from_state(state)
    assert restored == history and restored["inner"].count == 39 and restored.limit == 16
    assert "39 entries" not in repr(restored["inner"]) and "held of 39" in repr(restored["inner"])
