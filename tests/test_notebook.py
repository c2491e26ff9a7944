"""mlo in a notebook: the graph shows as a picture, and a clone folder named `mlo` beside the
notebook does not hide the installed package."""

import contextlib
import pathlib
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest
import zmq
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]

CELLS = ['''\
import torch
import mlo

net, lam = torch.nn.Linear(3, 1), torch.nn.Parameter(torch.zeros(3))

@mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
def inner(module, outer):
    return ((module(torch.eye(3)) - 1) ** 2).mean() + (outer() ** 2).sum()

@mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad="aid_cg")
def outer(inner):
    return ((inner(torch.ones(1, 3)) - 2) ** 2).mean()

program = mlo.Program(inner, outer)''', "program.graph"]


@pytest.fixture
def beside_clone(tmp_path):
    """Return a folder holding a copy of this repository named `mlo`, as after `git clone`."""
    clone = tmp_path / "mlo"
    clone.mkdir()
    shutil.copytree(ROOT / "mlo", clone / "mlo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    return tmp_path


def test_graph_displays_as_svg_in_a_notebook_beside_a_clone_named_mlo(beside_clone):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = NotebookClient(notebook, timeout=60, startup_timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(beside_clone)}})
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(client.setup_kernel())
        except (RuntimeError, TimeoutError, zmq.ZMQError) as error:  # the kernel died or hung
            pytest.skip(f"no Jupyter kernel can start on this machine: {error}")
        try:
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
        except CellExecutionError as error:
            raise AssertionError(
                "the notebook failed; if it says module 'mlo' has no attribute 'level', this "
                "environment reaches mlo through an editable install's import hook, which a "
                "folder named mlo in the working directory shadows: run pip install -e . again "
                "(docs/notebooks.md)") from error
    outputs = notebook.cells[-1].outputs
    assert [o.output_type for o in outputs] == ["execute_result"]
    picture = outputs[0].data["image/svg+xml"]
    assert picture.lstrip().startswith("<svg") and ">inner<" in picture and ">outer<" in picture
    assert "text/markdown" not in outputs[0].data  # Jupyter would show it instead of the picture


def test_editable_install_is_not_shadowed_by_a_clone_folder_named_mlo(beside_clone):
    """Build the editable wheel that `pip install -e .` installs, and find `mlo` through it from
    the folder that holds the clone, where the clone itself is a namespace package `mlo`."""
    build = ("from setuptools import build_meta; "
             f"build_meta.build_editable({str(beside_clone / 'wheel')!r})")
    subprocess.run([sys.executable, "-c", build], cwd=beside_clone / "mlo", check=True,
                   capture_output=True, timeout=60)
    site = beside_clone / "site"
    zipfile.ZipFile(next((beside_clone / "wheel").glob("*.whl"))).extractall(site)
    # -S -E: no site-packages and no PYTHONPATH but the wheel's; the working directory still comes
    # first on sys.path, as in Jupyter. find_spec says which `mlo` wins without importing torch.
    where = ("import importlib.util, site; {}"
             "spec = importlib.util.find_spec('mlo'); print(spec.origin)")
    found = []
    for setup in ("", f"site.addsitedir({str(site)!r}); "):
        out = subprocess.run([sys.executable, "-S", "-E", "-c", where.format(setup)],
                             cwd=beside_clone, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        found.append(out.stdout.strip())
    assert found == ["None",  # without the install, the clone is a namespace package `mlo`
                     str(beside_clone / "mlo" / "mlo" / "__init__.py")]
