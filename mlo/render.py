"""Draw a program's `Graph` as a standalone SVG picture (pure Python: no graphviz, no `dot`).

Levels are boxes in layers, lowest at the bottom: a level sits one layer above the highest level
it is connected to that comes before it in the graph's order (lowest first). Each edge kind is one
entry of `EDGE_KINDS`; edges between the same two levels are drawn side by side, and an edge that
skips layers bends aside so that it does not run through the boxes it passes.
"""

from __future__ import annotations

from html import escape
from typing import NamedTuple

__all__ = ["svg"]


class EdgeKind(NamedTuple):
    """How to draw one kind of edge: the `Graph` attribute holding its (from, to) pairs, its
    label, and its SVG stroke-dasharray ("" for a solid line)."""

    attribute: str
    label: str
    dash: str


EDGE_KINDS = (
    EdgeKind("l2u", "solution", ""),    # (lower, upper): the lower solution enters the upper cost
    EdgeKind("u2l", "params", "6 4"),   # (upper, lower): the upper params enter the lower cost
    EdgeKind("init", "init", "2 3"),    # (upper, lower): the lower level starts from the upper one
)

BOX_HEIGHT, LAYER_GAP, BOX_GAP, MARGIN = 34, 84, 72, 24
CHAR_WIDTH = 7.5    # of the 13 px sans-serif used for names and labels, generously rounded up
BEND = 70           # sideways reach of an edge per layer it skips
LABEL_SPOTS = (0.5, 0.7, 0.3, 0.8, 0.2)  # where a label may sit along its edge (0: lower end)


def svg(graph) -> str:
    """Return an SVG document drawing `graph`'s levels and edges, lowest level at the bottom.

    Cost: O(levels + edges); the text is small enough to embed in a notebook output.

    >>> from mlo.graph import Graph
    >>> picture = svg(Graph(order=("inner", "outer"), u2l=(("outer", "inner"),),
    ...                     l2u=(("inner", "outer"),)))
    >>> picture.startswith("<svg") and ">inner<" in picture and ">params<" in picture
    True
    """
    edges = [(kind, a, b) for kind in EDGE_KINDS for a, b in getattr(graph, kind.attribute, ())]
    boxes = _layout(graph.order, [(a, b) for _, a, b in edges])
    lines, reach = _edges(edges, boxes)
    left = min([x for x, _, _ in boxes.values()] + reach, default=0) - MARGIN
    width = max([x + w for x, _, w in boxes.values()] + reach, default=0) + MARGIN - left
    height = max((y for _, y, _ in boxes.values()), default=0) + BOX_HEIGHT + 2 * MARGIN
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="{left:.0f} {-MARGIN} {width:.0f} {height:.0f}" font-family="sans-serif" '
             f'font-size="13">', "<title>mlo program graph</title>",
             '<defs><marker id="mlo-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
             'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
             'fill="#444"/></marker></defs>',
             # an opaque ground keeps the dark text legible in dark notebook themes
             f'<rect x="{left:.0f}" y="{-MARGIN}" width="{width:.0f}" height="{height:.0f}" '
             'fill="white"/>', *lines]
    for name, (x, y, w) in boxes.items():
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{BOX_HEIGHT}" rx="6" '
                     f'fill="#e8eef8" stroke="#3b5b92" stroke-width="1.5"/>')
        parts.append(f'<text x="{x + w / 2:.1f}" y="{y + BOX_HEIGHT / 2 + 4.5:.1f}" '
                     f'text-anchor="middle" fill="#111">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _layout(order, pairs) -> dict[str, tuple[float, float, float]]:
    """Return (x, y, width) of each level's box: layer 0 (the lowest levels) at the bottom."""
    position = {name: i for i, name in enumerate(order)}
    layer: dict[str, int] = {}
    for name in order:
        below = [other for a, b in pairs for other in (a, b)
                 if name in (a, b) and other != name and position.get(other, 1e9) < position[name]]
        layer[name] = 1 + max((layer[other] for other in below), default=-1)
    rows: dict[int, list[str]] = {}
    for name in order:
        rows.setdefault(layer[name], []).append(name)
    widths = {name: max(80.0, CHAR_WIDTH * len(name) + 28) for name in order}
    row_width = {k: sum(widths[n] for n in row) + BOX_GAP * (len(row) - 1)
                 for k, row in rows.items()}
    top = max(rows, default=0)
    boxes = {}
    for k, row in rows.items():  # rows centred on x = 0; the picture's frame is fitted afterwards
        x = -row_width[k] / 2
        for name in row:
            boxes[name] = (x, (top - k) * (BOX_HEIGHT + LAYER_GAP), widths[name])
            x += widths[name] + BOX_GAP
    return boxes


def _edges(edges, boxes) -> tuple[list[str], list[float]]:
    """Return the SVG elements of every edge, each labelled, and the x they reach out to."""
    bends = _bends(edges, boxes)
    ports = _ports(edges, boxes, bends)
    parts, reach, taken = [], [], []
    for i, (kind, a, b) in enumerate(edges):
        up = boxes[b][1] < boxes[a][1]
        start = (ports[i, a], boxes[a][1] + (0 if up else BOX_HEIGHT))
        end = (ports[i, b], boxes[b][1] + (BOX_HEIGHT if up else 0))
        curve = (start, (start[0] + bends[i], (2 * start[1] + end[1]) / 3),
                 (end[0] + bends[i], (start[1] + 2 * end[1]) / 3), end)
        dash = f' stroke-dasharray="{kind.dash}"' if kind.dash else ""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in curve[1:])
        parts.append(f'<path d="M{start[0]:.1f},{start[1]:.1f} C{path}" fill="none" '
                     f'stroke="#444" stroke-width="1.4"{dash} marker-end="url(#mlo-arrow)"/>')
        upper = b if up else a
        left = bends[i] < 0 or (bends[i] == 0 and ports[i, upper] < _centre(boxes[upper]) - 1)
        label, span = _label(curve if up else curve[::-1], left, kind.label, taken)
        parts.append(label)
        reach += [_point(curve, 0.5)[0], *span]
    return parts, reach


def _label(curve, left: bool, text: str, taken: list) -> tuple[str, tuple[float, float]]:
    """Place `text` beside a curve drawn from the lower level up: at the first of `LABEL_SPOTS`
    where it overlaps no label placed before (else at the first spot), and record it in `taken`."""
    width, side = CHAR_WIDTH * len(text), -1 if left else 1
    spots = []
    for t in LABEL_SPOTS:
        x, y = _point(curve, t)
        x += 6 * side
        spots.append((x, y, (x - width, x) if left else (x, x + width)))
    free = [s for s in spots if not any(s[2][0] < b and a < s[2][1] and abs(s[1] - y) < 15
                                        for a, b, y in taken)]
    x, y, span = (free or spots)[0]
    taken.append((*span, y))
    return (f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="{"end" if left else "start"}" '
            f'fill="#444" font-size="12">{escape(text)}</text>'), span


def _bends(edges, boxes) -> list[float]:
    """Bend each edge that skips a layer aside (alternating sides between the same two levels)."""
    seen: dict[frozenset, int] = {}
    bends = []
    for _, a, b in edges:
        skipped = round(abs(boxes[a][1] - boxes[b][1]) / (BOX_HEIGHT + LAYER_GAP)) - 1
        if skipped < 1:
            bends.append(0.0)
            continue
        j = seen[frozenset((a, b))] = seen.get(frozenset((a, b)), -1) + 1
        side = 1 if _centre(boxes[a]) + _centre(boxes[b]) >= 0 else -1  # rows centre on 0
        bends.append(side * (-1) ** j * BEND * skipped * (1 + j // 2))
    return bends


def _ports(edges, boxes, bends) -> dict[tuple[int, str], float]:
    """Spread the ends of the edges on each side of a box, ordered to avoid crossings."""
    sides: dict[tuple[str, bool], list[tuple]] = {}
    for i, (_, a, b) in enumerate(edges):
        up = boxes[b][1] < boxes[a][1]
        for here, there, top in ((a, b, up), (b, a, not up)):
            key = ((bends[i] > 0) - (bends[i] < 0), _centre(boxes[there]), i)
            sides.setdefault((here, top), []).append((key, i))
    ports = {}
    for (name, _), ends in sides.items():
        x, _, w = boxes[name]
        for j, (_, i) in enumerate(sorted(ends)):
            ports[i, name] = x + w * (j + 1) / (len(ends) + 1)
    return ports


def _centre(box) -> float:
    return box[0] + box[2] / 2


def _point(curve, t: float) -> tuple[float, float]:
    """The point at parameter t of a cubic Bézier curve."""
    weights = ((1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3)
    return tuple(sum(w * p[k] for w, p in zip(weights, curve)) for k in (0, 1))
