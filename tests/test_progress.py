"""Where run() shows its progress bar: notebook kernels and terminals, not logs."""

import io
import sys
import types

import pytest

from mlo import progress

tqdm = pytest.importorskip("tqdm")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def fake_ipython(monkeypatch, shell):
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", module)


def test_plain_python_and_terminal_ipython_are_not_notebooks(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not progress.in_notebook()
    fake_ipython(monkeypatch, None)  # IPython imported, but no shell running
    assert not progress.in_notebook()
    fake_ipython(monkeypatch, types.SimpleNamespace(config={"TerminalInteractiveShell": {}}))
    assert not progress.in_notebook()


def test_a_jupyter_kernel_is_a_notebook(monkeypatch):
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object(), config={}))
    assert progress.in_notebook()
    fake_ipython(monkeypatch, types.SimpleNamespace(config={"IPKernelApp": {}}))
    assert progress.in_notebook()


def test_interactive_means_a_notebook_or_a_terminal(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert progress.interactive(Terminal()) and not progress.interactive(io.StringIO())
    assert not progress.interactive(object())  # a replaced stderr without isatty
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()))
    assert progress.interactive(io.StringIO())  # a kernel's stderr is no terminal


def test_bar_is_silent_in_logs_unless_asked(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    assert progress.bar(10, 0, None) is None
    forced = progress.bar(10, 3, True)
    assert forced.n == 3 and forced.total == 10 and forced.mininterval == 30.0
    forced.close()
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert progress.bar(10, 0, False) is None
    shown = progress.bar(10, 0, None)
    assert shown is not None and shown.mininterval == 0.1
    shown.close()


def test_notebook_without_widgets_falls_back_to_text(monkeypatch):
    import tqdm.auto
    import tqdm.std

    def widget(**options):
        raise ImportError("IProgress not found. Please update jupyter and ipywidgets.")

    monkeypatch.setattr(progress, "interactive", lambda: True)
    monkeypatch.setattr(tqdm.auto, "tqdm", widget)
    bar = progress.bar(5, 0, None)
    assert type(bar) is tqdm.std.tqdm
    bar.close()
