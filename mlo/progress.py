"""The progress bar of `Program.run`: shown where a person watches, silent in logs."""

from __future__ import annotations

import sys


def in_notebook() -> bool:
    """Return whether this process is a Jupyter kernel (Jupyter, JupyterLab, VS Code, Colab).

    A kernel's IPython shell has a `kernel` attribute and an `IPKernelApp` config section; a
    terminal IPython has neither, and plain Python has no IPython shell at all.
    """
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    if shell is None:
        return False
    return hasattr(shell, "kernel") or "IPKernelApp" in getattr(shell, "config", {})


def interactive(stream=None) -> bool:
    """Return whether a person watches: a notebook kernel, or `stream` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return in_notebook() or stream.isatty()
    except (AttributeError, ValueError):  # a replaced stream without isatty, or a closed one
        return False


def bar(total: int, initial: int, progress: bool | None):
    """Return a tqdm bar over global steps, or None.

    `progress=None` shows it when `interactive()`: tqdm.auto draws a widget in a notebook (text
    when ipywidgets is missing) and text in a terminal. `progress=True` forces it (in a log file
    it is redrawn at most every 30 s), `progress=False` silences it.
    """
    watched = interactive()
    if progress is False or (progress is None and not watched):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    options = dict(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   mininterval=0.1 if watched else 30.0)
    try:
        return tqdm(**options)
    except ImportError:  # tqdm.notebook without ipywidgets: fall back to the text bar
        from tqdm.std import tqdm as text
        return text(file=sys.stderr, **options)


def validation_line(bar, step: int, total: int, row: dict) -> None:
    """Write one line with a validation's results above the bar (it stays in the scrollback)."""
    if bar is None:
        return
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items() if k != "step")
    bar.write(f"step {step}/{total}: {values}")
