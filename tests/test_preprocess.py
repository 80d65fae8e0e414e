"""Unit tests of fgc.frontend.preprocess: line statements, ``##`` comments, ``[block]`` headers,
origin markers (docs/language.md)."""

from __future__ import annotations

import jinja2
import pytest

from fgc.frontend.environment import _trim_newlines

from fgc.frontend.preprocess import (
    MARK_CLOSE,
    MARK_OPEN,
    marker,
    preprocess,
    strip_markers,
    strip_trailing_comment,
)


def pp(text: str, file_id: int = 0) -> list[str]:
    """The preprocessed source's lines, with origin markers shown as ``<file:line>``."""
    source = preprocess(text, file_id).source
    return source.replace(MARK_OPEN, "<").replace(MARK_CLOSE, ">").split("\n")


def jinja_render(text: str, **context) -> str:
    """Preprocess then render with Jinja2 as fgc does (trim_blocks), markers stripped."""
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True)
    env.filters["fgc_trim_newlines"] = _trim_newlines
    rendered = env.from_string(preprocess(text, 0).source).render(**context)
    return strip_markers(rendered)[0]


# --- line statements ---------------------------------------------------------------------------


def test_statement_markers_translate():
    assert pp("-- set x = 1") == ["{% set x = 1 %}"]
    assert pp("<< if a") == ["{%- if a %}"]
    assert pp(">> endif") == ["{% endif -%}"]
    assert pp("== super()") == ["<0:1>{{ super() }}"]
    assert pp("=> super()") == ["<0:1>{{ (super()) | string | fgc_trim_newlines }}"]


def test_statement_markers_keep_line_numbers_in_markers():
    lines = pp("a: 1\n== x\n=> y", file_id=7)
    assert lines == [
        "<7:1>a: 1",
        "<7:2>{{ x }}",
        "<7:3>{{ (y) | string | fgc_trim_newlines }}",
    ]


def test_print_statement_drops_the_blanks_before_it():
    # as Forgather's rewrite: the printed text brings its own indentation
    assert pp("    == super()") == ["<0:1>{{ super() }}"]
    assert pp("\t=> x") == ["<0:1>{{ (x) | string | fgc_trim_newlines }}"]


def test_indented_super_inside_a_yaml_block_keeps_the_parents_indentation():
    base = "outer:\n    [inner]\n    a: 1\n"
    child = '-- extends "base"\n    [inner]\n    == super()\n    b: 2\n'
    sources = {"base": preprocess(base, 0).source, "child": preprocess(child, 1).source}
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, loader=jinja2.DictLoader(sources))
    text = strip_markers(env.get_template("child").render())[0]
    assert text == "outer:\n    a: 1\n\n    b: 2\n"  # not "        a: 1", indented twice


def test_arrow_statement_trims_newlines_at_both_ends():
    assert jinja_render("=> x\ny: 2", x="\n\n    a: 1\n\n") == "    a: 1\ny: 2"


def test_statement_body_trailing_blanks_dropped():
    assert pp("-- set x = 1   ") == ["{% set x = 1 %}"]


def test_statement_needs_whitespace_after_marker():
    # `--set x` is not a statement: it stays a content line (with its origin marker)
    assert pp("--set x") == ["<0:1>--set x"]
    assert pp("==x") == ["<0:1>==x"]
    assert pp("<<: *base") == ["<0:1><<: *base"]  # a YAML merge key is not a statement


def test_statement_with_leading_blanks_and_tabs():
    assert pp("\t-- set y = 2") == ["{% set y = 2 %}"]
    assert pp("    -- if x") == ["{% if x %}"]
    assert pp("-- \tset z = 3")[0].startswith("{% ")


def test_statement_marker_followed_by_tab():
    assert pp("--\tset x = 1") == ["{% set x = 1 %}"]


def test_statement_trailing_comment_cut():
    assert pp("-- set x = 1 ## the default") == ["{% set x = 1 %}"]
    assert pp('== "a ##b"') == ['<0:1>{{ "a ##b" }}']


def test_double_hash_inside_string_literal_of_a_statement_is_text():
    # a statement body is Jinja2 code: every quote opens a string, whatever precedes it
    assert pp('-- set x = y ~ " ##b"') == ['{% set x = y ~ " ##b" %}']
    assert pp("-- set x = f(' ##') ## c") == ["{% set x = f(' ##') %}"]
    assert pp('== "a" ~ " ##b"') == ['<0:1>{{ "a" ~ " ##b" }}']
    assert pp("-- set x = 'a\\' ##' ## c") == ["{% set x = 'a\\' ##' %}"]
    assert jinja_render('-- set x = "a" ~ " ##b"\nv: {{ x }}\n') == "v: a ##b\n"


def test_statements_render_through_jinja():
    text = "-- set ns = namespace(x=1)\n-- set ns.x = ns.x + 1\nx: {{ ns.x }}\n"
    assert jinja_render(text) == "x: 2\n"


def test_rstrip_print_statement_trims_trailing_newlines():
    text = "-- set s = 'a: 1\\n\\n'\n=> s\nb: 2\n"
    assert jinja_render(text) == "a: 1\nb: 2\n"
    text = "-- set s = 'a: 1\\n\\n'\n== s\nb: 2\n"
    assert jinja_render(text) == "a: 1\n\n\nb: 2\n"


# --- ## comments -------------------------------------------------------------------------------


def test_comment_line_of_its_own():
    assert pp("## a comment") == ["{# #}"]
    assert pp("##") == ["{# #}"]
    assert pp("    ## indented comment") == ["{# #}"]


def test_trailing_comment_after_whitespace_cut():
    assert pp("x: 1 ## cut here") == ["<0:1>x: 1"]
    assert pp("x: 1\t## cut here") == ["<0:1>x: 1"]


def test_double_hash_without_whitespace_before_is_text():
    assert pp("w: a##b") == ["<0:1>w: a##b"]


def test_single_hash_survives():
    assert pp("x: 1 # a YAML comment") == ["<0:1>x: 1 # a YAML comment"]
    assert pp("# a YAML comment") == ["<0:1># a YAML comment"]


def test_double_hash_inside_quoted_scalars_is_text():
    # fgc: Forgather would cut `x: 'a ##b'` to `x: 'a`
    assert pp("x: 'a ##b'") == ["<0:1>x: 'a ##b'"]
    assert pp('y: "a ##b"') == ['<0:1>y: "a ##b"']
    assert pp("- 'a ##b'") == ["<0:1>- 'a ##b'"]
    assert pp("z: ['a ##b', \"c ##d\"]") == ["<0:1>z: ['a ##b', \"c ##d\"]"]


def test_comment_after_quoted_scalar_cut():
    assert pp('z: "a ##b" ## c') == ['<0:1>z: "a ##b"']
    assert pp("z: 'it''s ##x' ## c") == ["<0:1>z: 'it''s ##x'"]


def test_apostrophe_in_plain_scalar_is_not_a_quote():
    assert strip_trailing_comment("x: it's ## comment") == "x: it's"


def test_double_hash_inside_jinja_expression_is_text():
    assert pp("x: {{ '##' }} ## c") == ["<0:1>x: {{ '##' }}"]
    assert pp("x: {{ ' ##' }}") == ["<0:1>x: {{ ' ##' }}"]


def test_comment_rendered_away():
    text = "## heading\na: 1 ## trailing\nb: 'x ##y'\n"
    assert jinja_render(text) == "a: 1\nb: 'x ##y'\n"  # the comment line leaves nothing


# --- [block] headers ---------------------------------------------------------------------------


def test_block_header():
    # the last line keeps a newline at the end of its block, as Forgather's {{'\n'}}
    assert pp("[a]\nx: 1") == ["{% block a %}", "<0:2>x: 1{{ '\\n' }}{% endblock %}"]
    assert pp("[a]\nx: 1\n") == ["{% block a %}", "<0:2>x: 1", "{% endblock %}"]


def test_trimming_block_header():
    assert pp("[b!]  \nx: 1") == ["{%- block b -%}", "<0:2>x: 1{{ '\\n' }}{% endblock %}"]


def test_header_with_trailing_blanks():
    assert pp("[a] \t\nx: 1")[0] == "{% block a %}"


def test_things_that_are_not_headers():
    assert pp("[a] # comment") == ["<0:1>[a] # comment"]
    assert pp("key: [x]") == ["<0:1>key: [x]"]
    assert pp("[with-dash]") == ["<0:1>[with-dash]"]
    assert pp("[a b]") == ["<0:1>[a b]"]
    assert pp("[]") == ["<0:1>[]"]


def test_headers_record_blocks():
    result = preprocess("[a]\nx: 1\n[b_2]\ny: 2\n", 0)
    assert result.blocks == [("a", 1, 0), ("b_2", 3, 0)]


def test_nested_and_explicit_blocks_record_depth():
    text = "[outer]\n    [inner]\n    x: 1\n-- block ex\n[h]\ny: 2\n-- endblock\nz: 3\n"
    result = preprocess(text, 0)
    assert result.blocks == [("outer", 1, 0), ("inner", 2, 1), ("ex", 4, 2), ("h", 5, 3)]
    lines = result.source.split("\n")
    assert len(lines) == 9  # 8 lines and the empty one after the final newline
    # a statement line does not end [headers]; the [h] block inside the explicit block ends at its -- endblock
    assert lines[6] == "{% endblock %}{% endblock %}"
    assert result.source.endswith("{% endblock %}{% endblock %}")


def test_block_runs_to_next_header_at_same_indent():
    assert pp("[a]\nx: 1\n[b]\ny: 2") == [
        "{% block a %}",
        "<0:2>x: 1",
        "{% endblock %}{% block b %}",
        "<0:4>y: 2{{ '\\n' }}{% endblock %}",
    ]


def test_indented_header_nests_in_enclosing_block():
    lines = pp("[a]\nx: 1\n  [b]\n  y: 2\n[c]\nz: 3")
    assert lines == [
        "{% block a %}",
        "<0:2>x: 1",
        "{% block b %}",
        "<0:4>  y: 2",
        "{% endblock %}{% endblock %}{% block c %}",
        "<0:6>z: 3{{ '\\n' }}{% endblock %}",
    ]


def test_nested_block_ends_at_smaller_indent_header():
    lines = pp("[a]\n  [b]\n  y: 1\n  [c]\n  z: 2\n[d]\n")
    assert lines == [
        "{% block a %}",
        "{% block b %}",
        "<0:3>  y: 1",
        "{% endblock %}{% block c %}",
        "<0:5>  z: 2",
        "{% endblock %}{% endblock %}{% block d %}",
        "{% endblock %}",
    ]


def test_nested_blocks_overridable_by_jinja():
    env = jinja2.Environment(
        loader=jinja2.DictLoader(
            {
                "base": preprocess("[a]\nx: 1\n  [b]\n  y: 2\n[c]\nz: 3\n", 0).source,
                "child": preprocess('-- extends "base"\n[b]\n  y: 20\n', 1).source,
            }
        ),
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    text, _ = strip_markers(env.get_template("child").render())
    assert text == "x: 1\n  y: 20\nz: 3\n"


def test_line_count_preserved():
    text = (
        "## comment\n"
        "-- set ns = namespace()\n"
        "[a]\n"
        "x: 1 ## c\n"
        "  [b!]\n"
        "  == super()\n"
        "=> y\n"
        "z: {{ 1 +\n"
        "  2 }}\n"
        "{# a\n"
        "comment #}\n"
        "<< if x\n"
        ">> endif\n"
        "--set x\n"
    )
    assert preprocess(text, 0).source.count("\n") == text.count("\n")


def test_references_recorded_with_lines():
    result = preprocess("## c\n-- extends \"base.yaml\"\n<< include 'x/y.yaml'\n", 0)
    assert [(r.kind, r.name, r.line) for r in result.references] == [
        ("extends", "base.yaml", 2),
        ("include", "x/y.yaml", 3),
    ]


# --- origin markers ----------------------------------------------------------------------------


def test_blank_lines_get_no_marker():
    assert pp("a: 1\n\nb: 2") == ["<0:1>a: 1", "", "<0:3>b: 2"]


def test_strip_markers_gives_origins():
    source = preprocess("a: 1\n\n## c\nb: 2\n", 4).source
    text, origins = strip_markers(source)
    assert text == "a: 1\n\n{# #}\nb: 2\n"
    assert origins == [(4, 1), (4, 2), (4, 3), (4, 4), (4, 5)]


def test_strip_markers_last_marker_before_content_wins():
    line = marker(0, 3) + "  " + marker(1, 5) + "a: 1"
    text, origins = strip_markers(line)
    assert text == "  a: 1"
    assert origins == [(1, 5)]


def test_strip_markers_marker_after_content():
    text, origins = strip_markers("x" + marker(2, 9) + "y")
    assert text == "xy"
    assert origins == [(2, 9)]


def test_strip_markers_unmarked_lines_continue_previous():
    text, origins = strip_markers("\n" + marker(1, 10) + "a: |\n  b\n  c")
    assert text == "\na: |\n  b\n  c"
    assert origins == [None, (1, 10), (1, 11), (1, 12)]


def test_multiline_expression_gets_no_markers_inside():
    text = "a: 1\nx: {{ 1 +\n 2 }}\ny: 3\n\nz: 4"
    lines = pp(text)
    assert lines == ["<0:1>a: 1", "<0:2>x: {{ 1 +", " 2 }}", "<0:4>y: 3", "", "<0:6>z: 4"]
    clean, origins = strip_markers(preprocess(text, 0).source)
    assert clean == text
    assert origins == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6)]


def test_multiline_expression_with_header_like_and_statement_like_lines_inside():
    text = "x: {{ [\n[a]\n-- set\n] | length }}\ny: 1"
    assert pp(text) == ["<0:1>x: {{ [", "[a]", "-- set", "] | length }}", "<0:5>y: 1"]


def test_multiline_jinja_comment_left_alone():
    assert pp("{# a\n[a]\n#}\nb: 1") == ["<0:1>{# a", "[a]", "#}", "<0:4>b: 1"]


def test_raw_block_left_alone():
    text = "{% raw %}\n[a]\n-- x\n{% endraw %}\nb: 1"
    assert pp(text) == ["<0:1>{% raw %}", "[a]", "-- x", "{% endraw %}", "<0:5>b: 1"]


def test_rendered_lines_map_to_template_lines():
    text = "-- set ns = namespace()\n## comment\na: 1\n-- if true\nb: {{ 2 }}\n-- endif\nc: 3\n"
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True)
    rendered = env.from_string(preprocess(text, 5).source).render()
    clean, origins = strip_markers(rendered)
    lines = clean.split("\n")
    assert lines == ["a: 1", "b: 2", "c: 3", ""]
    assert origins[:3] == [(5, 3), (5, 5), (5, 7)]


@pytest.mark.parametrize("line", ["[a]", "  [a]", "\t[a]"])
def test_header_indentation_forms(line):
    assert pp(line)[0].endswith("{% block a %}{% endblock %}")


def test_hashes_in_a_quoted_scalar_after_a_tag_or_anchor_are_text():
    from fgc.frontend.preprocess import strip_trailing_comment

    assert strip_trailing_comment("x: !tag 'a ##b' ## cut") == "x: !tag 'a ##b'"
    assert strip_trailing_comment('x: &anchor "a ##b" ## cut') == 'x: &anchor "a ##b"'
    assert strip_trailing_comment("x: it's ## cut") == "x: it's"
