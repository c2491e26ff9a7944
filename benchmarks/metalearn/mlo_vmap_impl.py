"""MAML in mlo with the tasks side by side: mlo_impl's program with `tasks=T, vmap=True` on the
meta level (mlo/task_axis.py): every batch stacks the T tasks along a leading axis, one meta step
takes 5 global steps."""

from __future__ import annotations

from . import common, mlo_impl

UNSUPPORTED: dict[str, str] = {}


class Runner(mlo_impl.Runner):
    VMAP = True


def make(config: common.Config) -> Runner:
    return Runner(config)
