"""MkDocs hook: draw the program graphs that the guides show, with mlo's own renderer.

A line `<!-- graph: NAME -->` in a page becomes the picture of the program `NAME` below, as a
notebook would show it; an unknown name fails the build.
"""

from __future__ import annotations

import base64
import re

from mlo.graph import Node, infer
from mlo.render import svg

PROGRAMS = {  # name: levels as (level, declares hypergrad, levels its signature names)
    "reweighting": [("classifier", False, ("weighting",)), ("weighting", True, ("classifier",))],
    "domain-adaptation": [("pretrain", False, ("reweight",)), ("finetune", False, ("pretrain",)),
                          ("reweight", True, ("finetune", "pretrain"))],
}


def picture(name: str) -> str:
    """Return an <img> of the graph of `PROGRAMS[name]`."""
    graph = infer([Node(level, hypergrad, tuple((n, None) for n in names))
                   for level, hypergrad, names in PROGRAMS[name]])
    data = base64.b64encode(svg(graph).encode()).decode()
    return f'<img alt="the graph of the {name} program" src="data:image/svg+xml;base64,{data}">'


def on_page_markdown(markdown: str, **kwargs) -> str:
    return re.sub(r"<!-- graph: ([\w-]+) -->", lambda match: picture(match.group(1)), markdown)
