"""The MloError hierarchy and the helpers that make its messages point at the user's code."""

from __future__ import annotations

import difflib
import inspect
import tokenize


class MloError(Exception):
    """Base class of every error mlo raises on bad input."""


class LevelError(MloError, TypeError):
    """A `@mlo.level` declaration is malformed (caught at decoration time)."""


class GraphError(MloError):
    """The levels' signatures do not describe one consistent multilevel program."""


class LossError(MloError):
    """A level's cost function returned something that is not a finite scalar loss."""


class OptimizerError(MloError):
    """A level's optimizer does not match its module, or cannot be mirrored functionally."""


class NonFiniteError(MloError, FloatingPointError):
    """A loss or a hypergradient is NaN or infinite."""


class CheckpointError(MloError):
    """A checkpoint cannot be loaded into this program."""


class HandleError(MloError):
    """A cost reads a level's module or tensor directly instead of through the handle it was passed,
    so no hypergradient could flow through it."""


class MloWarning(UserWarning):
    """A setting that works but is probably not what was meant (e.g. fp16 on CPU)."""


class DistributedError(MloError):
    """A rank failed (or stopped responding) under data parallelism, so every rank stops."""


def closest(name: str, candidates) -> str:
    """Return a "Did you mean 'x'?" hint for the candidate closest to `name`, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in sorted(names)) or "(none)"


def where(fn) -> str:
    """Return `file:line:  def name(args)` for a user function, for pointing at its signature."""
    try:
        file = inspect.getsourcefile(fn) or "<unknown>"
        lines, line = inspect.getsourcelines(fn)
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        # no source, or a file name that is not the code's source (code compiled under another
        # name): inspect then reads unrelated lines, which may not even tokenize
        return f"<unknown>:  def {getattr(fn, '__name__', '?')}{inspect.signature(fn)}"
    for offset, text in enumerate(lines):
        if text.lstrip().startswith("def "):
            return f"{file}:{line + offset}:  {text.strip().rstrip(':')}"
    return f"{file}:{line}:  def {getattr(fn, '__name__', '?')}{inspect.signature(fn)}"
