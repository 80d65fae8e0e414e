"""Loading: rendered YAML text → :class:`fgc.ir.IRGraph`.

PyYAML composes the node tree (anchors and aliases become shared nodes); this module turns it into
IR nodes itself, so that tags, argument forms, scalar types (YAML 1.2 core schema) and duplicate
keys follow docs/language.md rather than PyYAML's YAML 1.1 defaults.
"""

from __future__ import annotations

import re

import yaml

from ..errors import DiagnosticSink, FgcError, Location
from ..ir import IRGraph, Node
from .render import Rendered

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


class _Loader:
    def __init__(self, rendered: Rendered, sink: DiagnosticSink):
        self.rendered = rendered
        self.sink = sink
        self.graph = IRGraph()
        self.seen: dict[int, str] = {}  # id(yaml node) -> IR node id (aliases share)
        self.names: dict[str, str] = {}  # @name -> node id

    def loc(self, ynode: yaml.Node) -> Location:
        mark = ynode.start_mark
        return self.rendered.location(mark.line, None)

    def error(self, message: str, ynode: yaml.Node, hint: str | None = None) -> None:
        self.sink.error(message, self.loc(ynode), hint)

    def build(self, ynode: yaml.Node, path: str) -> str:
        key = id(ynode)
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = path
        tag = ynode.tag
        if tag.startswith("!"):
            node = self.tagged(ynode, path)
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

    def scalar(self, ynode: yaml.ScalarNode):
        if _plain(ynode) and not ynode.tag.startswith("!"):
            return resolve_plain_scalar(ynode.value)
        return ynode.value

    @staticmethod
    def key_of(knode: yaml.ScalarNode) -> str:
        return knode.value if not _plain(knode) else str(resolve_plain_scalar(knode.value))

    def winning_items(self, ynode: yaml.MappingNode, what: str = "key"):
        """The mapping's entries after overrides: ``(key, key node, value node)`` in document order
        of each key's last declaration, plus where each key was (last) set.

        A key re-declared in another template file (an override through inheritance) keeps only
        its later value; the earlier one is never built, so none of its nodes linger in the graph
        (an anchor inside it is still built where an alias refers to it). Two declarations in one
        file are an error.
        """
        chosen: dict[str, int] = {}  # key -> index of its winning entry in ynode.value
        first_index: dict[str, int] = {}
        keys: dict[int, str] = {}
        locs: dict[str, Location] = {}
        self.last_history = history = {}  # key -> every place that set it, in order
        for index, (knode, vnode) in enumerate(ynode.value):
            if not isinstance(knode, yaml.ScalarNode):
                self.error("mapping keys must be scalars", knode)
                continue
            key = self.key_of(knode)
            kloc = self.loc(knode)
            if key in locs:
                first = locs[key]
                if first.file == kloc.file:
                    self.sink.error(
                        f"duplicate {what} {key!r} (first set at {first})",
                        kloc,
                        hint="a key may be re-declared only in a template that extends the first",
                    )
                    continue
                # an override through inheritance: the later value wins
            chosen[key], keys[index], locs[key] = index, key, kloc
            first_index.setdefault(key, index)
            history.setdefault(key, []).append(kloc)
        self.last_first_index = first_index
        entries = [
            (keys[i], knode, vnode)
            for i, (knode, vnode) in enumerate(ynode.value)
            if i in keys and chosen[keys[i]] == i
        ]
        return entries, locs

    def mapping_items(self, ynode: yaml.MappingNode, path: str, node: Node | None = None):
        """Keyword items of a mapping (after overrides); records each key's history on NODE."""
        entries, locs = self.winning_items(ynode)
        if node is not None:
            node.key_history = {k: v for k, v in self.last_history.items() if len(v) > 1}
        items: dict[str, str] = {}
        for key, _, vnode in entries:
            items[key] = self.build(vnode, f"{path}.{key}" if path else key)
        return items, locs

    def dlist(self, ynode: yaml.Node, node: Node, path: str) -> None:
        """``!dlist``: a list written as a mapping. Re-declaring a key (in a template that extends
        the first) replaces its entry in place; ``key: ~`` deletes it; ``null: ~`` is empty."""
        if not isinstance(ynode, yaml.MappingNode):
            self.error("!dlist needs a mapping (key: item)", ynode)
            return
        entries, locs = self.winning_items(ynode)
        node.key_history = {k: v for k, v in self.last_history.items() if len(v) > 1}
        order = self.last_first_index
        kept = []
        for key, _, vnode in sorted(entries, key=lambda e: order[e[0]]):
            if isinstance(vnode, yaml.ScalarNode) and _plain(vnode) and not vnode.tag.startswith("!"):
                if resolve_plain_scalar(vnode.value) is None:
                    continue  # deleted (or the `null: ~` empty-list idiom)
            kept.append((key, vnode))
        node.args = [self.build(v, f"{path}.{k}") for k, v in kept]
        node.key_locs = {k: locs[k] for k, _ in kept}

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
            elif kind == "dict":
                if not isinstance(ynode, yaml.MappingNode):
                    self.error("!dict needs a mapping", ynode)
                else:
                    node.kwargs, node.key_locs = self.mapping_items(ynode, path, node)
            elif isinstance(ynode, yaml.SequenceNode):
                node.args = [self.build(v, f"{path}.{i}") for i, v in enumerate(ynode.value)]
            else:
                self.error(f"!{kind} needs a sequence", ynode)
            self.register_name(name, node, ynode)
            return node
        if kind == "var":
            return self.var(ynode, path, loc)
        self.error(
            f"unknown tag !{kind}",
            ynode,
            hint="known tags: !singleton !call !factory !partial !lambda !var !dict !list !tuple !dlist",
        )
        return Node(path, "value", loc, value=None)

    def var(self, ynode: yaml.Node, path: str, loc: Location) -> Node:
        node = Node(path, "var", loc)
        if isinstance(ynode, yaml.ScalarNode):
            node.value = ynode.value
        elif isinstance(ynode, yaml.MappingNode):
            items = {k.value: v for k, v in ynode.value}
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
        keys = [k.value for k, _ in ynode.value]
        if keys and set(keys) <= {"args", "kwargs"}:
            for knode, vnode in ynode.value:
                if knode.value == "args":
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
        if isinstance(node, yaml.MappingNode):
            children = [c for pair in node.value for c in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
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
    entries, locs = loader.winning_items(root, what="target")
    first_seen: dict[str, int] = {}  # a target keeps the position of its first declaration
    for knode, _ in root.value:
        if isinstance(knode, yaml.ScalarNode):
            first_seen.setdefault(loader.key_of(knode), len(first_seen))
    built = {key: loader.build(vnode, key) for key, _, vnode in entries}
    for key in sorted(built, key=first_seen.__getitem__):
        table = loader.graph.definitions if key.startswith(".") else loader.graph.targets
        table[key] = built[key]
    sink.raise_if_errors()
    return loader.graph
