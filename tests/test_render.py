import doctest
import re
import xml.etree.ElementTree as ElementTree

from mlo import render
from mlo.graph import Graph, Node, infer
from mlo.render import CHAR_WIDTH, svg

SVG = "{http://www.w3.org/2000/svg}"


def node(name, hypergrad=False, *names):
    return Node(name, hypergrad, tuple((n, None) for n in names))


def bilevel():
    return infer([node("classifier", False, "weighting"), node("weighting", True, "classifier")])


def label_correction():
    return infer([node("classifier", False, "correct", "reweight"),
                  node("correct", True, "classifier"), node("reweight", True, "classifier")])


def domain_adaptation():
    return infer([node("pretrain", False, "reweight"), node("finetune", False, "pretrain"),
                  node("reweight", True, "finetune", "pretrain")])


def parse(graph):
    """Return the parsed picture: boxes {name: (x, y, w, h)}, edges [(d, dash, label)], labels."""
    root = ElementTree.fromstring(svg(graph))
    texts = root.findall(f"{SVG}text")
    names = [t.text for t in texts if t.get("text-anchor") == "middle"]
    boxes = {n: tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))
             for n, r in zip(names, root.findall(f"{SVG}rect")[1:])}  # [0]: the background
    labels = [t for t in texts if t.get("text-anchor") != "middle"]
    edges = [(p.get("d"), p.get("stroke-dasharray"), t.text)
             for p, t in zip(root.findall(f"{SVG}path"), labels)]
    return root, boxes, edges, labels


def ends(d):
    """The first and last point of a path `M x,y C ... x,y`."""
    points = [tuple(map(float, p.split(","))) for p in re.findall(r"-?[\d.]+,-?[\d.]+", d)]
    return points[0], points[-1]


def test_every_level_is_a_box_with_its_name_lowest_at_the_bottom():
    _, boxes, _, _ = parse(domain_adaptation())
    assert set(boxes) == {"pretrain", "finetune", "reweight"}
    assert boxes["pretrain"][1] > boxes["finetune"][1] > boxes["reweight"][1]


def test_levels_on_the_same_layer_share_a_row_without_overlapping():
    _, boxes, _, _ = parse(label_correction())
    (xc, yc, wc, _), (xr, yr, _, _) = boxes["correct"], boxes["reweight"]
    assert yc == yr < boxes["classifier"][1]
    assert xc + wc < xr


def test_solution_edges_are_solid_and_point_up_params_edges_are_dashed_and_point_down():
    _, boxes, edges, _ = parse(bilevel())
    assert sorted((dash or "", label) for _, dash, label in edges) == [("", "solution"),
                                                                       ("6 4", "params")]
    low, up = boxes["classifier"], boxes["weighting"]
    at_lower = []
    for d, dash, label in edges:
        (x1, y1), (x2, y2) = ends(d)
        if label == "solution":  # from the top of the lower box to the bottom of the upper box
            assert (y1, y2) == (low[1], up[1] + up[3])
            at_lower.append(x1)
        else:
            assert (y1, y2) == (up[1] + up[3], low[1])
            at_lower.append(x2)
    assert at_lower[0] != at_lower[1]  # edges between the same two levels are drawn side by side


def test_each_edge_kind_is_drawn_and_a_new_kind_needs_only_its_graph_attribute():
    graph = infer([node("adapt"), node("meta", True, "adapt")])
    graph.init = (("meta", "adapt"),)
    _, _, edges, _ = parse(graph)
    assert sorted(label for _, _, label in edges) == ["init", "solution"]
    assert [dash for _, dash, label in edges if label == "init"] == ["2 3"]


def test_an_edge_that_skips_a_layer_bends_around_the_level_between():
    _, boxes, edges, _ = parse(domain_adaptation())
    x, _, w, _ = boxes["finetune"]
    skipping = [d for d, _, _ in edges if "finetune" not in d and
                {ends(d)[0][1], ends(d)[1][1]} == {boxes["pretrain"][1],
                                                   boxes["reweight"][1] + boxes["reweight"][3]}]
    assert len(skipping) == 2  # pretrain's solution up to reweight, reweight's params down
    for d in skipping:
        controls = [tuple(map(float, p.split(","))) for p in re.findall(r"-?[\d.]+,-?[\d.]+", d)]
        middle_x = (controls[0][0] + 3 * controls[1][0] + 3 * controls[2][0] + controls[3][0]) / 8
        assert middle_x < x or middle_x > x + w


def test_labels_do_not_overlap_and_everything_lies_on_the_picture():
    for graph in (bilevel(), label_correction(), domain_adaptation()):
        root, boxes, _, labels = parse(graph)
        left, top, width, height = map(float, root.get("viewBox").split())
        ground = root.findall(f"{SVG}rect")[0]  # opaque, for dark notebook themes
        assert ground.get("fill") == "white"
        assert [float(ground.get(k)) for k in ("x", "y", "width", "height")] == \
            [left, top, width, height]
        spans = []
        for t in labels:
            x, y, size = float(t.get("x")), float(t.get("y")), CHAR_WIDTH * len(t.text)
            spans.append((x - size, x, y) if t.get("text-anchor") == "end" else (x, x + size, y))
        for i, (a, b, y) in enumerate(spans):
            assert left <= a and b <= left + width and top <= y <= top + height
            assert not any(a < b2 and a2 < b and abs(y - y2) < 12 for a2, b2, y2 in spans[i + 1:])
        for x, y, w, h in boxes.values():
            assert left <= x and x + w <= left + width and top <= y and y + h <= top + height


def test_names_are_escaped_and_a_graph_without_edges_draws():
    root = ElementTree.fromstring(svg(Graph(order=("a<b&c",), u2l=(), l2u=())))
    assert [t.text for t in root.findall(f"{SVG}text")] == ["a<b&c"]


def test_jupyter_shows_the_graph_as_this_svg():
    graph = bilevel()
    assert graph._repr_svg_() == svg(graph)
    assert not hasattr(graph, "_repr_markdown_")  # it would outrank the picture in Jupyter


def test_docstring_example_runs():
    result = doctest.testmod(render)
    assert result.attempted > 0 and result.failed == 0
