import inspect
import re

import pytest
import torch

import mlo
from mlo.graph import Node, infer


def node(name, hypergrad=False, *names, **annotated):
    """A Node naming `names` without annotation and `annotated` with 'upper' / 'lower'."""
    pairs = tuple((n, None) for n in names) + tuple(annotated.items())
    return Node(name, hypergrad, pairs, f"model.py:1:  def {name}(...)")


def paths(graph, name):
    return set(graph.paths[name])


# -- the paper's programs, inferred from Nodes ---------------------------------------------------

def test_bilevel_reweighting():
    graph = infer([node("classifier", False, "weighting"), node("weighting", True, "classifier")])
    assert set(graph.u2l) == {("weighting", "classifier")}
    assert set(graph.l2u) == {("classifier", "weighting")}
    assert graph.order == ("classifier", "weighting")
    assert graph.lowermost == ("classifier",)
    assert graph.reads("weighting") == ("classifier",)
    assert paths(graph, "weighting") == {("weighting", "classifier", "weighting")}
    assert set(graph.paths) == {"weighting"}


def test_label_correction_and_reweighting():
    graph = infer([node("classifier", False, "correct", "reweight"),
                   node("correct", True, "classifier"), node("reweight", True, "classifier")])
    assert set(graph.u2l) == {("correct", "classifier"), ("reweight", "classifier")}
    assert set(graph.l2u) == {("classifier", "correct"), ("classifier", "reweight")}
    assert graph.order[0] == "classifier" and set(graph.order[1:]) == {"correct", "reweight"}
    assert graph.lowermost == ("classifier",)
    assert paths(graph, "correct") == {("correct", "classifier", "correct")}
    assert paths(graph, "reweight") == {("reweight", "classifier", "reweight")}


def test_domain_adaptation_three_levels_two_paths():
    graph = infer([node("pretrain", False, "reweight"), node("finetune", False, "pretrain"),
                   node("reweight", True, "finetune", "pretrain")])
    assert set(graph.u2l) == {("reweight", "pretrain")}
    assert set(graph.l2u) == {("pretrain", "finetune"), ("finetune", "reweight"),
                              ("pretrain", "reweight")}
    assert graph.order == ("pretrain", "finetune", "reweight")
    assert graph.lowermost == ("pretrain",)
    assert set(graph.reads("reweight")) == {"finetune", "pretrain"}
    assert paths(graph, "reweight") == {("reweight", "pretrain", "finetune", "reweight"),
                                        ("reweight", "pretrain", "reweight")}
    assert graph.best_response_edges("reweight") == {"pretrain": ("reweight",),
                                                     "finetune": ("pretrain",)}


def test_darts():
    graph = infer([node("architecture", True, "classifier"),
                   node("classifier", False, "architecture")])
    assert set(graph.u2l) == {("architecture", "classifier")}
    assert set(graph.l2u) == {("classifier", "architecture")}
    assert graph.order == ("classifier", "architecture")
    assert paths(graph, "architecture") == {("architecture", "classifier", "architecture")}


def test_order_does_not_depend_on_declaration_order():
    nodes = [node("reweight", True, "finetune", "pretrain"), node("finetune", False, "pretrain"),
             node("pretrain", False, "reweight")]
    assert infer(nodes).order == ("pretrain", "finetune", "reweight")


def test_one_sided_annotation_settles_a_pair_that_both_declare_hypergrad():
    # DESIGN.md's example: def mid(batch, module, top: mlo.Upper, low); top names mid plainly.
    graph = infer([node("low", False, "mid"), node("mid", True, "low", top="upper"),
                   node("top", True, "mid")])
    assert set(graph.u2l) == {("top", "mid"), ("mid", "low")}
    assert set(graph.l2u) == {("mid", "top"), ("low", "mid")}
    assert graph.order == ("low", "mid", "top")
    assert paths(graph, "top") == {("top", "mid", "top")}
    assert paths(graph, "mid") == {("mid", "low", "mid")}


def test_lower_annotation_overrides_the_hypergrad_rule():
    graph = infer([node("a", True, b="lower"), node("b", False)])
    assert graph.l2u == (("b", "a"),) and graph.u2l == ()


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_name_lists_candidates_and_closest():
    with pytest.raises(mlo.GraphError, match=r"(?s)level 'outer' names 'innr', but no level has "
                       r"that name\..*model\.py:1:  def outer.*levels: 'inner', 'outer'\. "
                       r"Did you mean 'inner'\?"):
        infer([node("inner", False), node("outer", True, "innr")])


def test_naming_each_other_without_hypergrad():
    with pytest.raises(mlo.GraphError, match=r"levels '(a|b)' and '(a|b)' name each other, but "
                       r"neither declares hypergrad"):
        infer([node("a", False, "b"), node("b", False, "a")])


def test_both_declare_hypergrad_without_annotation():
    with pytest.raises(mlo.GraphError, match=r"(?s)levels 'a' and 'b' both declare hypergrad.*"
                       r"Annotate the parameter: 'b: mlo\.Upper'.*'b: mlo\.Lower'"):
        infer([node("a", True, "b"), node("b", True)])


@pytest.mark.parametrize("a_names_b", ["upper", "init"])  # mlo.Init also names an upper level
def test_conflicting_annotations(a_names_b):
    with pytest.raises(mlo.GraphError, match=r"levels 'a' and 'b' each annotate the other as "
                       r"mlo\.Upper"):
        infer([node("a", False, b=a_names_b), node("b", False, a="upper")])


def test_cycle_of_l2u_edges_names_its_levels_in_solution_order():
    # a names b, b names c, c names a: each named level is below its namer.
    with pytest.raises(mlo.GraphError, match=r"the levels a -> c -> b -> a form a cycle "
                       r"\(each is below the next\)"):
        infer([node("a", False, "b"), node("b", False, "c"), node("c", False, "a")])


def test_level_naming_itself():
    with pytest.raises(mlo.GraphError, match=r"(?s)level 's' names itself.*rename the parameter to 'module'"):
        infer([node("s", False, "s")])


# -- the same programs from real @mlo.level declarations ------------------------------------------

def test_domain_adaptation_from_declarations(parts):
    x = torch.ones(1, 2)

    @mlo.level(**parts())
    def pretrain(batch, module, reweight):
        return (reweight(x) * module(x)).sum()

    @mlo.level(**parts())
    def finetune(batch, module, pretrain):
        return (module(x) - pretrain(x)).pow(2).sum()

    @mlo.level(**parts("aid_fd"))
    def reweight(batch, finetune, pretrain):
        return finetune(x).sum() + pretrain(x).sum()

    graph = mlo.Program().graph
    assert set(graph.u2l) == {("reweight", "pretrain")}
    assert set(graph.l2u) == {("pretrain", "finetune"), ("finetune", "reweight"),
                              ("pretrain", "reweight")}
    assert graph.order == ("pretrain", "finetune", "reweight")
    assert paths(graph, "reweight") == {("reweight", "pretrain", "finetune", "reweight"),
                                        ("reweight", "pretrain", "reweight")}


def test_label_correction_from_declarations(parts):
    @mlo.level(**parts())
    def classifier(batch, module, correct, reweight):
        return module(batch).sum()

    @mlo.level(**parts("aid_cg"))
    def correct(batch, classifier):
        return classifier(batch).sum()

    @mlo.level(**parts("itd"))
    def reweight(batch, classifier):
        return classifier(batch).sum()

    graph = mlo.Program(classifier, correct, reweight).graph
    assert set(graph.u2l) == {("correct", "classifier"), ("reweight", "classifier")}
    assert set(graph.l2u) == {("classifier", "correct"), ("classifier", "reweight")}
    assert paths(graph, "correct") == {("correct", "classifier", "correct")}
    assert paths(graph, "reweight") == {("reweight", "classifier", "reweight")}


def test_unknown_name_points_at_the_users_file_and_line(parts):
    @mlo.level(**parts())
    def inner(batch, module):
        return module(batch).sum()

    line = inspect.currentframe().f_lineno + 2
    @mlo.level(**parts("itd"))  # noqa: E306
    def outer(batch, innr):
        return innr(batch).sum()

    location = re.escape(f"{__file__}:{line}:  def outer(batch, innr)")
    with pytest.raises(mlo.GraphError, match=rf"(?s)level 'outer' names 'innr', but no level has "
                       rf"that name\.\n  {location}\n  levels: 'inner', 'outer'\. "
                       rf"Did you mean 'inner'\?"):
        mlo.Program(inner, outer)


def test_mutual_naming_without_hypergrad_from_declarations(parts):
    @mlo.level(**parts())
    def a(batch, module, b):
        return module(batch).sum()

    @mlo.level(**parts())
    def b(batch, module, a):
        return module(batch).sum()

    with pytest.raises(mlo.GraphError, match="'(a|b)' and '(a|b)' name each other"):
        mlo.Program(a, b)


# -- printing and rendering -----------------------------------------------------------------------

def domain_adaptation():
    return infer([node("pretrain", False, "reweight"), node("finetune", False, "pretrain"),
                  node("reweight", True, "finetune", "pretrain")])


def test_print_shows_levels_edges_paths_and_order():
    text = str(domain_adaptation())
    assert "lowest first: pretrain, finetune, reweight" in text
    u2l, rest = text.split("u2l", 1)[1].split("l2u", 1)
    l2u, rest = rest.split("paths", 1)
    found_paths, order = rest.split("execution order", 1)
    assert "reweight -> pretrain" in u2l and "pretrain -> finetune" not in u2l
    assert {"pretrain -> finetune", "finetune -> reweight", "pretrain -> reweight"} <= \
        {line.strip() for line in l2u.splitlines()}
    assert "reweight: reweight -> pretrain -> finetune -> reweight" in found_paths
    assert "reweight: reweight -> pretrain -> reweight" in found_paths
    assert order.index("pretrain") < order.index("finetune") < order.index("reweight")


def test_mermaid_node_ids_cannot_clash_with_keywords():
    graph = infer([Node("end", False, (("graph", None),)), Node("graph", True, (("end", None),))])
    lines = graph.to_mermaid().splitlines()
    assert '    L_end["end"]' in lines and "    L_end -->|solution| L_graph" in lines


def test_mermaid_has_every_level_and_both_edge_kinds():
    text = domain_adaptation().to_mermaid()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("flowchart")
    for name in ("pretrain", "finetune", "reweight"):
        assert f'L_{name}["{name}"]' in lines[1:]
    solid = [line for line in lines if "-->" in line]
    dashed = [line for line in lines if "-.->" in line]
    assert len(solid) == 3 and len(dashed) == 1
    assert dashed[0] == "L_reweight -.->|params| L_pretrain"


# -- init edges (mlo.Init) -------------------------------------------------------------------------

def maml_graph():
    return infer([node("adapt", False, meta="init"), node("meta", True, "adapt")])


def test_init_edge_is_its_own_kind_and_starts_a_hypergradient_path():
    graph = maml_graph()
    assert graph.init == (("meta", "adapt"),) and graph.u2l == ()
    assert graph.l2u == (("adapt", "meta"),)
    assert graph.order == ("adapt", "meta") and graph.starts("meta") == ("adapt",)
    assert paths(graph, "meta") == {("meta", "adapt", "meta")}
    assert graph.best_response_edges("meta") == {"adapt": ("meta",)}


def test_init_settles_a_pair_that_both_declare_hypergrad():
    graph = infer([node("adapt", True, meta="init"), node("meta", True, "adapt")])
    assert graph.init == (("meta", "adapt"),) and graph.l2u == (("adapt", "meta"),)


def test_two_init_annotations_on_one_level():
    with pytest.raises(mlo.GraphError, match=r"level 'adapt' annotates 'a', 'b' as mlo\.Init, but "
                                             r"a level starts from one level's parameters"):
        infer([node("adapt", False, a="init", b="init"), node("a", True, "adapt"),
               node("b", True, "adapt")])


def test_print_and_mermaid_show_init_edges():
    graph = maml_graph()
    text = str(graph)
    init = text.split("init (lower starts each unroll window from upper's parameters):")[1]
    assert init.splitlines()[1].strip() == "meta -> adapt"
    assert "init (" not in str(domain_adaptation())  # no empty section where there is none
    lines = [line.strip() for line in graph.to_mermaid().splitlines()]
    assert "L_meta ==>|init| L_adapt" in lines and "L_adapt -->|solution| L_meta" in lines
    assert not any("-.->" in line for line in lines)
