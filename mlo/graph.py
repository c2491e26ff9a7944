"""Infer a multilevel program's dataflow graph from its levels' signatures (pure Python, no torch).

Each level is described by a `Node`: its name, whether it declares `hypergrad`, the levels its
signature names (with an optional direction annotation) and where it was defined. From these alone
the graph derives, by the rules of DESIGN.md §2:

- u2l edges U -> L: U's current parameters enter L's cost;
- init edges U -> L (`mlo.Init`): L starts each unroll window from U's parameters, θ₀ = φ; a
  kind of u2l edge (U is above L, and a hypergradient path may start with it);
- l2u edges L -> U: L's solution enters U's cost;
- the order of levels (lowest first), and which levels read which solutions;
- for every level that declares `hypergrad`, its hypergradient paths (paper eq. 2): one u2l edge
  out of the level, then l2u edges only, back into the level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import GraphError, closest, quoted


@dataclass(frozen=True)
class Node:
    """What the graph needs to know of one level."""

    name: str
    declares_hypergrad: bool
    names: tuple[tuple[str, str | None], ...]  # (named level, "upper" | "lower" | "init" | None)
    location: str = "<unknown>"


@dataclass
class Graph:
    """The inferred graph: levels lowest first, the edges of each kind, hypergradient paths.

    `print(graph)` shows it as text, `graph.to_mermaid()` returns Mermaid source, and a notebook
    shows it as an SVG picture (`mlo.render.svg`), lowest level at the bottom.
    """

    order: tuple[str, ...]
    u2l: tuple[tuple[str, str], ...]
    l2u: tuple[tuple[str, str], ...]
    init: tuple[tuple[str, str], ...] = ()  # (upper, lower): lower starts from upper's params
    paths: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    def starts(self, name: str) -> tuple[str, ...]:
        """Return the levels that start each unroll window from `name`'s parameters."""
        return tuple(low for up, low in self.init if up == name)

    def reads(self, name: str) -> tuple[str, ...]:
        """Return the levels whose solutions enter `name`'s cost (its l2u predecessors)."""
        return tuple(low for low, up in self.l2u if up == name)

    @property
    def lowermost(self) -> tuple[str, ...]:
        """Return the levels that read no other level's solution: they step every global step."""
        return tuple(n for n in self.order if not self.reads(n))

    def best_response_edges(self, name: str) -> dict[str, tuple[str, ...]]:
        """Map each level on `name`'s paths to the levels it is differentiated against.

        For a path (k, x1, ..., xm, k) the best-response Jacobians needed are dθ*_x1/dθ_k and
        dθ*_x(i+1)/dθ*_x(i); the last hop, xm -> k, is the direct derivative of k's cost.
        """
        edges: dict[str, list[str]] = {}
        for path in self.paths.get(name, ()):
            for upstream, level in zip(path[:-2], path[1:-1]):
                inputs = edges.setdefault(level, [])
                if upstream not in inputs:
                    inputs.append(upstream)
        return {level: tuple(inputs) for level, inputs in edges.items()}

    def __str__(self) -> str:
        lines = [f"Graph: {len(self.order)} levels, lowest first: {', '.join(self.order)}"]
        lines.append("  u2l (upper's parameters enter lower's cost):")
        lines += [f"    {u} -> {low}" for u, low in self.u2l] or ["    (none)"]
        lines.append("  l2u (lower's solution enters upper's cost):")
        lines += [f"    {low} -> {u}" for low, u in self.l2u] or ["    (none)"]
        if self.init:
            lines.append("  init (lower starts each unroll window from upper's parameters):")
            lines += [f"    {u} -> {low}" for u, low in self.init]
        lines.append("  hypergradient paths:")
        for name, paths in self.paths.items():
            lines += [f"    {name}: {' -> '.join(p)}" for p in paths] or [f"    {name}: (none)"]
        if not self.paths:
            lines.append("    (no level declares hypergrad)")
        steps = [n if not self.reads(n) else f"{n} (after {', '.join(self.reads(n))})"
                 for n in self.order]
        lines.append(f"  execution order per global step: {'; '.join(steps)}")
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        """Return the graph as Mermaid flowchart source (solid: l2u, dashed: u2l, thick: init)."""
        lines = ["flowchart BT"] + [f'    L_{n}["{n}"]' for n in self.order]  # ids avoid keywords
        lines += [f"    L_{low} -->|solution| L_{u}" for low, u in self.l2u]
        lines += [f"    L_{u} -.->|params| L_{low}" for u, low in self.u2l]
        lines += [f"    L_{u} ==>|init| L_{low}" for u, low in self.init]
        return "\n".join(lines)

    def _repr_svg_(self) -> str:
        """Draw the graph for Jupyter as SVG (pure Python: no graphviz or other system package)."""
        from .render import svg
        return svg(self)


def infer(nodes: list[Node]) -> Graph:
    """Build the `Graph` of a program from its levels, or raise a `GraphError` saying what to fix."""
    by_name = {n.name: n for n in nodes}
    u2l, l2u, init = [], [], []
    for node in nodes:
        _check_one_init(node)
        for other, annotation in node.names:
            if other not in by_name:
                raise GraphError(
                    f"Program: level '{node.name}' names '{other}', but no level has that name.\n"
                    f"  {node.location}\n  levels: {quoted(by_name)}.{closest(other, by_name)}")
            if other == node.name:
                raise GraphError(
                    f"Program: level '{node.name}' names itself.\n  {node.location}\n  A level "
                    f"reaches its own parameters through 'module'; rename the parameter to "
                    f"'module'.")
            upper = _upper_of(node, by_name[other], annotation)
            if annotation == "init":
                init.append((other, node.name))
            elif upper == other:
                u2l.append((other, node.name))
            else:
                l2u.append((other, node.name))
    order = _order(nodes, u2l + init, l2u)
    graph = Graph(order=order, u2l=tuple(u2l), l2u=tuple(l2u), init=tuple(init))
    graph.paths = {n.name: _paths(n.name, u2l + init, l2u) for n in nodes if n.declares_hypergrad}
    return graph


def _check_one_init(node: Node) -> None:
    starts = [other for other, annotation in node.names if annotation == "init"]
    if len(starts) > 1:
        raise GraphError(
            f"Program: level '{node.name}' annotates {quoted(starts)} as mlo.Init, but a level "
            f"starts from one level's parameters.\n  {node.location}\n  Keep mlo.Init on one "
            f"of them; annotate the others mlo.Upper.")


def _upper_of(node: Node, other: Node, annotation: str | None) -> str:
    """Return which of the pair (node names other) is the upper level.

    An annotation on either side of a pair settles it: in `def mid(batch, module, top: mlo.Upper)`
    'top' is above 'mid' also where 'top' names 'mid' without an annotation. Annotations on both
    sides must agree.
    """
    reverse = dict(other.names).get(node.name)  # how `other` annotates `node`, if it names it
    annotation, reverse = (_UPPER.get(a, a) for a in (annotation, reverse))  # Init names an upper
    if annotation is not None and reverse is not None and annotation == reverse:
        raise GraphError(
            f"Program: levels '{node.name}' and '{other.name}' each annotate the other as "
            f"mlo.{annotation.capitalize()}, so neither is above the other.\n  {node.location}\n"
            f"  {other.location}\n  Keep one annotation, or make them agree.")
    if annotation is not None:
        return other.name if annotation == "upper" else node.name
    if reverse is not None:
        return node.name if reverse == "upper" else other.name
    if node.declares_hypergrad and other.declares_hypergrad:
        raise GraphError(
            f"Program: levels '{node.name}' and '{other.name}' both declare hypergrad, so the "
            f"direction of '{node.name}' naming '{other.name}' is ambiguous.\n  {node.location}\n"
            f"  Annotate the parameter: '{other.name}: mlo.Upper' if '{other.name}' is above "
            f"'{node.name}', or '{other.name}: mlo.Lower' if it is below.")
    if other.declares_hypergrad:
        return other.name
    return node.name


_UPPER = {"init": "upper"}


def _order(nodes, u2l, l2u) -> tuple[str, ...]:
    """Sort levels lowest first (Kahn's algorithm, declaration order breaks ties)."""
    below = {n.name: set() for n in nodes}  # level -> levels directly below it
    for upper, lower in u2l:
        below[upper].add(lower)
    for lower, upper in l2u:
        below[upper].add(lower)
    for a, b in l2u:
        if (b, a) in l2u:
            raise GraphError(
                f"Program: levels '{a}' and '{b}' name each other, but neither declares hypergrad, "
                f"so each would be below the other.\n  Declare hypergrad=... on the upper one "
                f"(the one that learns through the other's solution).")
    order, placed = [], set()
    while len(order) < len(nodes):
        ready = [n.name for n in nodes if n.name not in placed and below[n.name] <= placed]
        if not ready:
            cycle = _cycle({n: b - placed for n, b in below.items() if n not in placed})[::-1]
            raise GraphError(
                f"Program: the levels {' -> '.join(cycle)} form a cycle (each is below the next), "
                f"so no level can step first.\n  Break the cycle: make one of them read the "
                f"other's current parameters by declaring hypergrad on the upper one, or annotate "
                f"a parameter with mlo.Upper / mlo.Lower.")
        order.append(ready[0])
        placed.add(ready[0])
    return tuple(order)


def _cycle(below: dict[str, set[str]]) -> list[str]:
    """Return one cycle of the `below` relation (each name above the next), first name repeated."""
    start = next(iter(below))
    seen: list[str] = []
    node = start
    while node not in seen:
        seen.append(node)
        node = sorted(below[node])[0]
    return seen[seen.index(node):] + [node]


def _paths(name: str, u2l, l2u) -> tuple[tuple[str, ...], ...]:
    """Return every path name -u2l-> x1 -l2u-> ... -l2u-> name."""
    found = []

    def walk(path):
        for low, up in l2u:
            if low != path[-1]:
                continue
            if up == name:
                found.append((*path, name))
            else:
                walk((*path, up))

    for upper, lower in u2l:
        if upper == name:
            walk((name, lower))
    return tuple(found)
