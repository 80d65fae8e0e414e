"""Loading: rendered YAML text → :class:`fgc.ir.IRGraph`.

PyYAML composes the node tree (anchors and aliases become shared nodes); this module turns it into
IR nodes itself, so that tags, argument forms, scalar types (YAML 1.2 core schema) and duplicate
keys follow docs/language.md rather than PyYAML's YAML 1.1 defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import DiagnosticSink, FgcError, Location, display_path
from ..ir import IRGraph, Node
from .render import Rendered
from .templates import library_name

CALL_TAGS = {
    "singleton": "singleton",
    "call": "singleton",
    "factory": "factory",
    "partial": "partial",
    "lambda": "partial",
}
CONTAINER_TAGS = {"dict", "list", "tuple", "dlist"}

_INT_RE = re.compile(r"^[-+]?[0-9]+$|^0x[0-9a-fA-F]+$|^0o[0-7]+$")  # 1.2 core: 017 is 17, 1_000 a string
_FLOAT_RE = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_TAG_RE = re.compile(r"^!(?P<kind>[A-Za-z_]+)(?::(?P<spec>[^@]*))?(?:@(?P<name>\w+))?$")
_ARG_KEY_RE = re.compile(r"^arg(\d+)$")
# A node's properties as written at its start: an anchor and/or a tag, in either order.
_PROPERTY_RE = re.compile(r"(?:&(?P<anchor>[^\s,\[\]{}]+)|(?P<tag>!<[^>]*>|![^\s,\[\]{}]*))[ \t]*")
_LINE_BREAK_RE = re.compile("\r\n|\r|\n|\x85|\u2028|\u2029")  # YAML's (libyaml's) line breaks
_CORE = "tag:yaml.org,2002:"
MERGE_TAG = _CORE + "merge"  # what the resolver gives a plain `<<` key


def resolve_plain_scalar(text: str):
    """YAML 1.2 core schema for plain (unquoted) scalars."""
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if _INT_RE.match(text):
        if text.startswith("0x"):
            return int(text, 16)
        if text.startswith("0o"):
            return int(text, 8)
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    lowered = text.lower()
    if lowered in (".inf", "+.inf"):
        return float("inf")
    if lowered == "-.inf":
        return float("-inf")
    if lowered == ".nan":
        return float("nan")
    return text


def _plain(ynode: yaml.ScalarNode) -> bool:
    """Whether a scalar was written plain (unquoted): PyYAML says None, its C composer ''."""
    return not ynode.style


def plain_data(ynode: yaml.Node):
    """Untagged YAML data (scalars, sequences, mappings) with YAML 1.2 core scalars."""
    if isinstance(ynode, yaml.MappingNode):
        return {plain_data(k): plain_data(v) for k, v in ynode.value}
    if isinstance(ynode, yaml.SequenceNode):
        return [plain_data(v) for v in ynode.value]
    return resolve_plain_scalar(ynode.value) if _plain(ynode) else ynode.value


@dataclass
class _Entries:
    """A mapping's entries after merges and overrides."""

    entries: list  # (key, key node, value node), in document order of each key's winning entry
    locs: dict  # key -> where its winning entry set it
    history: dict  # key -> every place that set it, in order
    first_index: dict  # key -> position of its first entry


class _Loader:
    def __init__(self, rendered: Rendered, sink: DiagnosticSink):
        self.rendered = rendered
        self.sink = sink
        self.graph = IRGraph()
        self.seen: dict[int, str] = {}  # id(yaml node) -> IR node id (aliases share)
        self.names: dict[str, str] = {}  # @name -> node id
        self.lines = _LINE_BREAK_RE.split(rendered.text)
        self.winning: dict[int, _Entries] = {}  # id(merged mapping) -> its entries, once
        self.merging: set[int] = set()  # mappings whose merges are being flattened
        self.root_keys: set[str] = set()  # every key the root mapping writes

    def loc(self, ynode: yaml.Node) -> Location:
        mark = ynode.start_mark
        return self.rendered.location(mark.line, None)

    def error(self, message: str, ynode: yaml.Node, hint: str | None = None) -> None:
        self.sink.error(message, self.loc(ynode), hint)

    def properties(self, ynode: yaml.Node) -> tuple[str | None, str | None]:
        """The anchor and the tag written at YNODE's start (the composer keeps neither as
        written: ``!!str 1e-4`` and ``1e-4`` differ only in the text)."""
        if isinstance(ynode, yaml.ScalarNode) and _plain(ynode) and not ynode.value:
            if ynode.tag == _CORE + "null":
                return None, None  # `a:` with nothing: its mark is wherever the next token is
        mark = ynode.start_mark
        text = self.lines[mark.line][mark.column:] if mark.line < len(self.lines) else ""
        anchor = tag = None
        for _ in range(2):
            m = _PROPERTY_RE.match(text)
            if not m:
                break
            anchor = anchor or m.group("anchor")
            tag = tag or m.group("tag")
            text = text[m.end():]
        return anchor, tag

    def build(self, ynode: yaml.Node, path: str) -> str:
        key = id(ynode)
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = path
        tag = ynode.tag
        if tag.startswith("!"):
            node = self.tagged(ynode, path)
        elif self.properties(ynode)[1] is not None and (core := self.core_tagged(ynode, path)):
            node = core
        elif isinstance(ynode, yaml.MappingNode):
            node = Node(path, "dict", self.loc(ynode))
            node.kwargs, node.key_locs = self.mapping_items(ynode, path, node)
        elif isinstance(ynode, yaml.SequenceNode):
            node = Node(path, "list", self.loc(ynode))
            node.args = [self.build(item, f"{path}.{i}") for i, item in enumerate(ynode.value)]
        else:
            node = Node(path, "value", self.loc(ynode), value=self.scalar(ynode))
        self.graph.add(node)
        self.graph.link(node, fresh=True)
        return path

    def core_tagged(self, ynode: yaml.Node, path: str) -> Node | None:
        """A node with an explicit YAML tag (``!!str 1e-4``, ``!<tag:...>``, ``! x``): the value
        that tag gives, checked; None where the tag changes nothing (``!!map``, ``!!seq``, ``!``
        on a collection). Other YAML tags (``!!python/...``, ``!!set``, ``!!binary``, ...) are
        errors, never read as if untagged."""
        loc = self.loc(ynode)
        written = self.properties(ynode)[1]
        scalar = isinstance(ynode, yaml.ScalarNode)
        tag = ynode.tag
        if written == "!":  # YAML's non-specific tag: a scalar is a string
            return Node(path, "value", loc, value=ynode.value) if scalar else None
        if tag == _CORE + "map" and isinstance(ynode, yaml.MappingNode):
            return None
        if tag == _CORE + "seq" and isinstance(ynode, yaml.SequenceNode):
            return None
        if scalar and tag == _CORE + "str":
            return Node(path, "value", loc, value=ynode.value)
        wanted = {"int": int, "float": (int, float), "bool": bool, "null": type(None)}
        name = tag[len(_CORE):] if tag.startswith(_CORE) else None
        shown = f"!!{name}" if name is not None else f"!<{tag}>"
        if scalar and name in wanted:
            value = resolve_plain_scalar(ynode.value)
            if isinstance(value, wanted[name]) and not (name != "bool" and isinstance(value, bool)):
                return Node(path, "value", loc, value=float(value) if name == "float" else value)
            self.error(f"{shown} {ynode.value!r} is not a YAML 1.2 {name}", ynode)
            return Node(path, "value", loc, value=None)
        if name in ("str", "int", "float", "bool", "null", "map", "seq"):
            self.error(f"{shown} does not fit a {type(ynode).__name__[:-4].lower()}", ynode)
        else:
            self.error(
                f"YAML tag {shown} is not supported",
                ynode,
                hint="fgc reads the tags of docs/language.md (a callable is !singleton:SPEC, "
                "!factory:SPEC or !partial:SPEC), and of YAML's own only !!str, !!int, !!float, "
                "!!bool, !!null, !!map and !!seq",
            )
        return Node(path, "value", loc, value=None)

    def scalar(self, ynode: yaml.ScalarNode):
        if _plain(ynode) and not ynode.tag.startswith("!"):
            return resolve_plain_scalar(ynode.value)
        return ynode.value

    @staticmethod
    def key_of(knode: yaml.ScalarNode) -> str:
        return knode.value if not _plain(knode) else str(resolve_plain_scalar(knode.value))

    def flat_entries(self, ynode: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node, bool]]:
        """The mapping's entries with its merge keys (``<<: *x``, ``<<: [*x, *y]``) expanded as
        YAML 1.1 (and Forgather) merge: ``(key node, value node, merged)``, the merged entries
        first, ordered so that a later entry wins: an explicit key beats a merged one, and in a
        list of mappings an earlier mapping beats a later one."""
        merged: list[tuple[yaml.Node, yaml.Node, bool]] = []
        own: list[tuple[yaml.Node, yaml.Node, bool]] = []
        merge_at: Location | None = None
        for knode, vnode in ynode.value:
            if knode.tag != MERGE_TAG:
                own.append((knode, vnode, False))
                continue
            kloc = self.loc(knode)
            if merge_at is not None and merge_at.file == kloc.file:
                self.sink.error(
                    f"duplicate key '<<' (first set at {merge_at})",
                    kloc,
                    hint="merge several mappings with one key: <<: [*a, *b]",
                )
                continue
            merge_at = kloc
            sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
            if isinstance(vnode, yaml.SequenceNode) and not vnode.value:
                self.error("a merge key '<<' needs a mapping or a list of mappings", vnode)
            for source in reversed(sources):
                if not isinstance(source, yaml.MappingNode):
                    self.error(
                        "a merge key '<<' needs a mapping or a list of mappings",
                        source,
                        hint="write <<: *defaults or <<: [*a, *b], where &defaults is a mapping",
                    )
                    continue
                if id(source) in self.merging or source is ynode:
                    self.error("a merge key '<<' merges the mapping that contains it", source)
                    continue
                merged.extend((k, v, True) for _, k, v in self.entries(source).entries)
        return merged + own

    def entries(self, ynode: yaml.MappingNode, path: str = "") -> _Entries:
        """A (non-root) mapping's winning entries, computed (and its errors reported) once,
        however often it is merged into others."""
        key = id(ynode)
        if key not in self.winning:
            self.merging.add(key)
            try:
                self.winning[key] = self.winning_items(ynode, path=path)
            finally:
                self.merging.discard(key)
        return self.winning[key]

    def key_checked(self, knode: yaml.Node) -> str | None:
        """The key a key node gives, or None (and an error) for one fgc cannot use as a key."""
        if not isinstance(knode, yaml.ScalarNode):
            self.error("mapping keys must be scalars", knode)
            return None
        written = self.properties(knode)[1]
        if knode.tag.startswith("!") or written not in (None, "!", "!!str"):
            self.error(f"a mapping key cannot carry the tag {written or knode.tag}", knode)
            return None
        return knode.value if written is not None else self.key_of(knode)

    def winning_items(
        self, ynode: yaml.MappingNode, what: str = "key", root: bool = False, path: str = ""
    ) -> _Entries:
        """The mapping's entries after merges and overrides.

        A key re-declared in another template file (an override through inheritance) keeps only
        its later value; the earlier one is never built, so none of its nodes linger in the graph
        (an anchor inside it is still built where an alias refers to it). Two declarations in one
        file are an error, except (at the ROOT) those of a definition (``.define: &x ...``, a key
        that starts with "."): Forgather's idiom writes one several times in a file, and each
        occurrence is a definition of its own (its anchor is what matters), under a key of its
        own (:meth:`definition_key`). A merged key yields to an explicit one without an error.
        """
        chosen: dict[str, int] = {}  # key -> index of its winning entry in the flat entries
        first_index: dict[str, int] = {}
        keys: dict[int, str] = {}
        locs: dict[str, Location] = {}
        own: dict[str, Location] = {}  # keys the mapping itself writes (not merged)
        history: dict[str, list[Location]] = {}
        written: dict[str, list[Location]] = {}  # the mapping's own declarations of each key
        flat = self.flat_entries(ynode)
        for index, (knode, vnode, merged) in enumerate(flat):
            key = self.key_of(knode) if merged else self.key_checked(knode)
            if key is None:
                continue
            kloc = self.loc(knode)
            if not merged and key in own:
                first = own[key]
                if first.file != kloc.file:
                    pass  # an override through inheritance: the later value wins
                elif root and key.startswith("."):
                    key = self.definition_key(key, vnode, own)
                else:
                    self.sink.error(
                        f"duplicate {what} {key!r} (first set at {first})",
                        kloc,
                        hint="a key may be re-declared only in a template that extends the first",
                    )
                    continue
            if not merged:
                own[key] = kloc
                written.setdefault(key, []).append(kloc)
            chosen[key], keys[index], locs[key] = index, key, kloc
            first_index.setdefault(key, index)
            history.setdefault(key, []).append(kloc)
        for key, lines in written.items():
            # an override (not the key's first declaration, its default) that a later template
            # overrides again: its value never reaches the program (docs/language.md)
            for i in range(1, len(lines) - 1):
                if self.users_file(lines[i].file):
                    self.sink.warning(
                        f"{f'{path}.{key}' if path else key} set here has no effect: {display_path(lines[i + 1].file)}:{lines[i + 1].line} "
                        "sets it again",
                        lines[i],
                    )
        entries = [
            (keys[i], knode, vnode)
            for i, (knode, vnode, _) in enumerate(flat)
            if i in keys and chosen[keys[i]] == i
        ]
        if any(merged for _, _, merged in flat):
            # as YAML 1.1 builds a merged mapping: each key where it first appears
            entries.sort(key=lambda e: first_index[e[0]])
        return _Entries(entries, locs, history, first_index)

    def users_file(self, file: str) -> bool:
        """Whether FILE is one of the user's templates: not fgc's library, and, in a project, a
        file of the project (a workspace's or Forgather's library is not the user's)."""
        if library_name(file) is not None:
            return False
        source = self.rendered.source
        project = source.project if source is not None else None
        return project is None or project.dir in Path(file).resolve().parents

    def definition_key(self, key: str, vnode: yaml.Node, taken: dict) -> str:
        """The key of a repeated definition (KEY written again): "." + its anchor's name, which
        also names it in generated code, or KEY_2, KEY_3, ... when it has none or that is taken."""
        anchor = self.properties(vnode)[0]
        if anchor and "." + anchor not in taken and "." + anchor not in self.root_keys:
            return "." + anchor
        n = 2
        while f"{key}_{n}" in taken or f"{key}_{n}" in self.root_keys:
            n += 1
        return f"{key}_{n}"

    def mapping_items(self, ynode: yaml.MappingNode, path: str, node: Node | None = None):
        """Keyword items of a mapping (after merges and overrides); records each key's history on
        NODE."""
        won = self.entries(ynode, path)
        if node is not None:
            node.key_history = {k: v for k, v in won.history.items() if len(v) > 1}
        items: dict[str, str] = {}
        for key, _, vnode in won.entries:
            items[key] = self.build(vnode, f"{path}.{key}" if path else key)
        return items, won.locs

    def dlist(self, ynode: yaml.Node, node: Node, path: str) -> None:
        """``!dlist``: a list written as a mapping. Re-declaring a key (in a template that extends
        the first) replaces its entry in place; ``key: ~`` deletes it; ``null: ~`` is empty."""
        if self.empty(ynode):
            return  # `x: !dlist` with no value: an empty list, as in Forgather
        if not isinstance(ynode, yaml.MappingNode):
            self.error("!dlist needs a mapping (key: item)", ynode)
            return
        won = self.entries(ynode, path)
        node.key_history = {k: v for k, v in won.history.items() if len(v) > 1}
        kept = []
        for key, _, vnode in sorted(won.entries, key=lambda e: won.first_index[e[0]]):
            if (
                isinstance(vnode, yaml.ScalarNode)
                and _plain(vnode)
                and not vnode.tag.startswith("!")
                and self.properties(vnode)[1] in (None, "!!null")
                and resolve_plain_scalar(vnode.value) is None
            ):
                continue  # deleted (or the `null: ~` empty-list idiom)
            kept.append((key, vnode))
        node.args = [self.build(v, f"{path}.{k}") for k, v in kept]
        node.key_locs = {k: won.locs[k] for k, _ in kept}

    @staticmethod
    def empty(ynode: yaml.Node) -> bool:
        """Whether a tagged node has no value at all (``x: !dict``, or ``!dict ''``): Forgather's
        container tags read it as the empty container."""
        return isinstance(ynode, yaml.ScalarNode) and ynode.value == ""

    def register_name(self, name: str | None, node: Node, ynode: yaml.Node) -> None:
        if not name:
            return
        if name in self.names and self.names[name] != node.id:
            self.error(f"two different nodes are named @{name}", ynode)
        self.names[name] = node.id

    def tagged(self, ynode: yaml.Node, path: str) -> Node:
        m = _TAG_RE.match(ynode.tag)
        loc = self.loc(ynode)
        if not m:
            self.error(f"malformed tag {ynode.tag!r}", ynode)
            return Node(path, "value", loc, value=None)
        kind, spec, name = m.group("kind"), m.group("spec"), m.group("name")
        if kind in CALL_TAGS:
            if not spec:
                self.error(f"tag !{kind} needs a callable spec, e.g. !{kind}:torch.nn:Linear", ynode)
                return Node(path, "value", loc, value=None)
            node = Node(path, "call", loc, mode=CALL_TAGS[kind], spec=spec, name=name)
            self.call_arguments(ynode, node, path)
            self.register_name(name, node, ynode)
            return node
        if kind in CONTAINER_TAGS:
            if spec:
                self.error(f"tag !{kind} takes no spec (did you mean !{kind}:@{spec}?)", ynode)
            node = Node(path, "list" if kind == "dlist" else kind, loc, name=name)
            if kind == "dlist":
                self.dlist(ynode, node, path)
            elif self.empty(ynode):
                pass  # `x: !dict`, `y: !list` with no value: empty, as in Forgather
            elif kind == "dict":
                if not isinstance(ynode, yaml.MappingNode):
                    hint = "write `x: !dict` alone for an empty dict"
                    self.error("!dict needs a mapping", ynode, hint=hint)
                else:
                    node.kwargs, node.key_locs = self.mapping_items(ynode, path, node)
            elif isinstance(ynode, yaml.SequenceNode):
                node.args = [self.build(v, f"{path}.{i}") for i, v in enumerate(ynode.value)]
            else:
                hint = f"write `x: !{kind}` alone for an empty {kind}"
                self.error(f"!{kind} needs a sequence", ynode, hint=hint)
            self.register_name(name, node, ynode)
            return node
        if kind == "var":
            return self.var(ynode, path, loc)
        if kind == "meta":
            # a build-time function given the unbuilt graph of its arguments: lowering/meta.py
            # carries out the ones fgc registers and refuses the rest
            if not spec:
                self.error("tag !meta needs a spec, e.g. !meta:forgather.codegen:generate_code", ynode)
                return Node(path, "value", loc, value=None)
            node = Node(path, "call", loc, mode="meta", spec=spec, name=name)
            self.call_arguments(ynode, node, path)
            self.register_name(name, node, ynode)
            return node
        self.error(
            f"unknown tag !{kind}",
            ynode,
            hint="known tags: !singleton !call !factory !partial !lambda !meta !var !dict !list !tuple !dlist",
        )
        return Node(path, "value", loc, value=None)

    def var(self, ynode: yaml.Node, path: str, loc: Location) -> Node:
        node = Node(path, "var", loc)
        if isinstance(ynode, yaml.ScalarNode):
            node.value = ynode.value
        elif isinstance(ynode, yaml.MappingNode):
            items = {key: v for key, _, v in self.entries(ynode, path).entries}
            if "name" not in items or set(items) - {"name", "default"}:
                self.error("!var mapping needs 'name' and optionally 'default'", ynode)
                return node
            node.value = items["name"].value
            if "default" in items:
                node.default = self.build(items["default"], f"{path}.default")
        elif isinstance(ynode, yaml.SequenceNode) and len(ynode.value) in (1, 2):
            node.value = ynode.value[0].value
            if len(ynode.value) == 2:
                node.default = self.build(ynode.value[1], f"{path}.default")
        else:
            self.error("!var takes NAME, {name: N, default: D} or [N, D]", ynode)
        if not isinstance(node.value, str) or not node.value:
            self.error("!var needs a variable name", ynode)
        return node

    def call_arguments(self, ynode: yaml.Node, node: Node, path: str) -> None:
        if isinstance(ynode, yaml.ScalarNode):
            if ynode.value != "" or not _plain(ynode):
                value = Node(f"{path}.arg0", "value", node.loc, value=self.scalar_arg(ynode))
                self.graph.add(value)
                node.args = [value.id]
            return
        if isinstance(ynode, yaml.SequenceNode):
            node.args = [self.build(v, f"{path}.arg{i}") for i, v in enumerate(ynode.value)]
            return
        won = self.entries(ynode, path)
        keys = [key for key, _, _ in won.entries]
        if keys and set(keys) <= {"args", "kwargs"}:
            for key, _, vnode in won.entries:
                if key == "args":
                    if not isinstance(vnode, yaml.SequenceNode):
                        self.error("'args' must be a sequence", vnode)
                        continue
                    node.args = [self.build(v, f"{path}.arg{i}") for i, v in enumerate(vnode.value)]
                elif not isinstance(vnode, yaml.MappingNode):
                    self.error("'kwargs' must be a mapping", vnode)
                else:
                    node.kwargs, node.key_locs = self.mapping_items(vnode, path, node)
            return
        items, locs = self.mapping_items(ynode, path, node)
        positional = {}
        for key in list(items):
            m = _ARG_KEY_RE.match(key)
            if m:
                positional[int(m.group(1))] = items.pop(key)
        if positional:
            expected = list(range(len(positional)))
            if sorted(positional) != expected:
                self.error(f"positional keys must be arg0..arg{len(positional) - 1}", ynode)
            node.args = [positional[i] for i in sorted(positional)]
        node.kwargs, node.key_locs = items, locs

    def scalar_arg(self, ynode: yaml.ScalarNode):
        if _plain(ynode):
            return resolve_plain_scalar(ynode.value)
        return ynode.value


# PyYAML's C composer (libyaml) when the installed PyYAML has it; the pure-Python one otherwise.
# Only the node tree is used: tags, scalars and duplicate keys are interpreted by :class:`_Loader`.
_Composer = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree: libyaml's composer for speed; on an error, PyYAML's own composer
    again, whose messages name more (e.g. the anchor that is defined twice)."""
    try:
        return yaml.compose(text, Loader=_Composer)
    except yaml.YAMLError:
        if _Composer is yaml.SafeLoader:
            raise
    return yaml.compose(text, Loader=yaml.SafeLoader)


# Limits of one config's YAML (docs/safety.md): deeper nesting would exhaust the composer's and
# the passes' recursion; more expanded nodes (an alias bomb: anchors of lists of aliases) would
# take the passes that walk values as trees minutes and gigabytes.
MAX_YAML_DEPTH = 100
MAX_EXPANDED_NODES = 10**6


def too_deep(text: str) -> yaml.Mark | None:
    """Where TEXT's collections first nest deeper than MAX_YAML_DEPTH, from its parse events
    (iterative, so any depth is safe); None if they do not. A YAML error leaves the rest to the
    composer."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Composer):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    return event.start_mark
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return None
    return None


def recursive_node(root: yaml.Node) -> yaml.Node | None:
    """The first collection (in document order) that contains itself through an alias
    (``&x [1, *x]``), which YAML allows and no config can mean; None if there is none.
    Iterative, and each node is entered once."""
    done: set[int] = set()
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if id(node) in done:
            continue
        children = _children(node)
        if children is None:
            done.add(id(node))
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in reversed(children):
            if id(child) in on_path:
                return node
            if id(child) not in done:
                stack.append((child, False))
    return None


def _children(node: yaml.Node) -> list | None:
    """A collection node's children (a mapping's keys and values), or None for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [c for pair in node.value for c in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return None


def too_large(root: yaml.Node) -> yaml.Node | None:
    """The first node (innermost, in document order) whose value, its aliases expanded, holds more
    than MAX_EXPANDED_NODES nodes; None if there is none. A node's expanded size is 1 plus that
    of its children (keys included), computed once per node: aliases share nodes."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        children = _children(node)
        if children is None:
            size[id(node)] = 1
            continue
        if not children_done:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(children) if id(c) not in size)
            continue
        total = 1 + sum(size.get(id(c), 0) for c in children)
        if total > MAX_EXPANDED_NODES:
            return node
        size[id(node)] = total
    return None


def load(rendered: Rendered) -> IRGraph:
    """Build the IR graph of a rendered config. Every independent error is reported together."""
    sink = DiagnosticSink()
    deep = too_deep(rendered.text)
    if deep is not None:
        raise FgcError(
            f"YAML nests deeper than {MAX_YAML_DEPTH} levels here (fgc's limit)",
            rendered.location(deep.line, None),
        )
    try:
        root = _compose(rendered.text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at_end = mark is not None and mark.index >= len(rendered.text.rstrip())
        if exc.context_mark and mark is exc.problem_mark and at_end:
            mark = exc.context_mark  # unterminated at the end of the text: where it was opened
        loc = rendered.location(mark.line, None) if mark else Location(str(rendered.root.path))
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:  # e.g. "second occurrence" of "found duplicate anchor 'x'"
            where = f" at {rendered.location(exc.context_mark.line)}" if exc.context_mark else ""
            problem = f"{exc.problem} ({exc.context}{where})"
        raise FgcError(f"YAML: {problem}", loc) from None
    except yaml.YAMLError as exc:
        raise FgcError(f"YAML: {exc}", Location(str(rendered.root.path))) from None
    loader = _Loader(rendered, sink)
    if root is None:
        raise FgcError("the config is empty", Location(str(rendered.root.path)))
    cycle = recursive_node(root)
    if cycle is not None:
        raise FgcError(
            "this value contains itself (an alias inside the anchor it refers to)",
            loader.loc(cycle),
            hint="a config is a tree with shared parts; it cannot contain itself",
        )
    big = too_large(root)
    if big is not None:
        raise FgcError(
            f"this value holds more than {MAX_EXPANDED_NODES} YAML nodes once its aliases are "
            "expanded (fgc's limit)",
            loader.loc(big),
            hint="an alias repeats the whole anchored value wherever it is used; "
            "anchors of lists of aliases multiply",
        )
    if not isinstance(root, yaml.MappingNode):
        raise FgcError("the config must be a mapping of targets", loader.loc(root))
    loader.root_keys = {loader.key_of(k) for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
    won = loader.winning_items(root, what="target", root=True)
    built = {key: loader.build(vnode, key) for key, _, vnode in won.entries}
    # a target keeps the position of its first declaration
    for key in sorted(built, key=won.first_index.__getitem__):
        table = loader.graph.definitions if key.startswith(".") else loader.graph.targets
        table[key] = built[key]
    sink.raise_if_errors()
    rendered.warnings.extend(w for w in sink.warnings if w not in rendered.warnings)
    return loader.graph
