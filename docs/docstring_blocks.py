"""Show the code in mlo's docstrings as code blocks on the documentation site.

The docstrings are written to read well in `help()` and to run under doctest: `>>>` examples and
`Example::` literal blocks (an indented block after a line ending in `::`). Markdown would join
the former into a paragraph (quoting the `>>>`) and keep the `::`; this griffe extension (named in
mkdocs.yml) fences both before mkdocstrings renders them. The source docstrings are unchanged.
"""

from __future__ import annotations

import textwrap

import griffe


def fence(text: str) -> str:
    """Return `text` with doctest examples and `::` literal blocks turned into fenced code."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            end = _until(lines, i, lambda s: bool(s.strip()))
            out += ["", "```pycon", *textwrap.dedent("\n".join(lines[i:end])).splitlines(), "```"]
            i = end
        elif line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            depth = _indent(line)
            end = _until(lines, i + 1, lambda s: not s.strip() or _indent(s) > depth)
            while end > i + 1 and not lines[end - 1].strip():
                end -= 1  # trailing blank lines belong to the text after the block
            block = textwrap.dedent("\n".join(lines[i + 1:end])).strip("\n").splitlines()
            out += [line.rstrip()[:-1], "", "```python", *block, "```"]
            i = end
        else:
            out.append(line)
            i += 1
    return "\n".join(out)


def _until(lines: list[str], start: int, inside) -> int:
    end = start
    while end < len(lines) and inside(lines[end]):
        end += 1
    return end


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


class DocstringBlocks(griffe.Extension):
    """Fence the code in every docstring as griffe loads it."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence(obj.docstring.value)
