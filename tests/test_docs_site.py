"""The documentation site: every public name is in the API reference, every page is in the
navigation, and the guides' code runs. (`mkdocs build --strict` in .ci/run checks the rest.)"""

import ast
import base64
import importlib
import importlib.util
import inspect
import linecache
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = ["mlo", "mlo.hypergrad", "mlo.linsolve", "mlo.loggers", "mlo.optim", "mlo.render"]
GUIDES = ["index.md", "methods.md", "training-loop.md", "evaluation.md", "notebooks.md"]


def public_names(module_name: str) -> list[str]:
    """`__all__`, or else every top-level def, class and assignment without a leading '_'."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for statement in ast.parse(inspect.getsource(module)).body:
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            names.append(statement.name)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def documented() -> list[str]:
    """The objects the reference renders: the `::: path` lines of docs/reference/*.md."""
    return [m for page in sorted((DOCS / "reference").glob("*.md"))
            for m in re.findall(r"^::: (\S+)$", page.read_text(), re.M)]


def resolve(path: str):
    """Return the object at a dotted path as the reference tool reads it: the longest importable
    module prefix, then attributes (so `mlo.level` is the module, `mlo.level.level` the
    decorator)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(path)


def documents(entry, obj) -> bool:
    """Whether a reference entry documents `obj`: it is `obj`, or the class of an instance of a
    class of mlo (such as `mlo.registry`)."""
    if entry is obj:
        return True
    plain = not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj))
    return plain and entry is type(obj) and entry.__module__.startswith("mlo.")


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_reference_entry(module_name):
    module = importlib.import_module(module_name)
    names = public_names(module_name)
    assert names
    entries = [resolve(path) for path in documented()]
    missing = [n for n in names if not any(documents(e, getattr(module, n)) for e in entries)]
    assert not missing, (f"public names of {module_name} missing from docs/reference/*.md: "
                         f"{missing}; add a '::: {module_name}.NAME' line for each (where NAME "
                         f"is also a submodule's name, the path of its definition, as in "
                         f"'::: mlo.level.level')")


def test_every_reference_entry_names_an_existing_object():
    stale = []
    for path in documented():
        try:
            resolve(path)
        except (ModuleNotFoundError, AttributeError):
            stale.append(path)
    assert not stale, f"docs/reference/*.md documents names that do not exist: {stale}"


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages
    assert set(GUIDES) <= set(pages)


@pytest.mark.parametrize("page", GUIDES)
def test_guide_code_runs(page):
    """Run each ```python block of a guide, in order, in one namespace (```py marks fragments)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S)
    namespace: dict = {}
    for number, code in enumerate(blocks):
        filename = f"<docs/{page}, python block {number + 1}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        exec(compile(code, filename, "exec"), namespace)  # the blocks assert what they show


def load(name: str):
    """Import one of the site's build helpers in docs/ by file name."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_code_is_fenced_for_the_site():
    pytest.importorskip("griffe", reason="the docs extra is not installed")
    blocks = load("docstring_blocks")
    text = ("Summary.\n\nExample::\n\n    program = f(\n        1)\n\nAfter.\n\n"
            ">>> x = 1\n>>> x\n1\n\nEnd.")
    assert blocks.fence(text).splitlines() == [
        "Summary.", "", "Example:", "", "```python", "program = f(", "    1)", "```", "",
        "After.", "", "", "```pycon", ">>> x = 1", ">>> x", "1", "```", "", "End."]


def test_graph_markers_become_pictures_of_the_programs():
    hooks = load("hooks")
    page = hooks.on_page_markdown("Text.\n\n<!-- graph: reweighting -->\n")
    encoded = re.fullmatch(r'Text\.\n\n<img alt="[^"]+" src="data:image/svg\+xml;base64,(\S+)">\n',
                           page).group(1)
    picture = base64.b64decode(encoded).decode()
    assert ">classifier<" in picture and ">weighting<" in picture
    with pytest.raises(KeyError):
        hooks.on_page_markdown("<!-- graph: no-such-program -->")
