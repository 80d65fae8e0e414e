"""The IR: a graph of the config's nodes (networkx), each knowing the file and line it came from.

Node kinds:
- ``call``: a callable spec with a mode: ``singleton`` (called once, shared by every reference),
  ``factory`` (called anew at each use), ``partial`` (``functools.partial``) or ``meta`` (a
  build-time function of the unbuilt graph below it, carried out by lowering/meta.py);
- ``var``: a variable bound at construction time, with an optional default;
- ``dict``, ``list``, ``tuple``: containers;
- ``value``: a scalar (None, bool, int, float, str).

Node ids are the config path of the node's first occurrence (``model.layer_factory``), so names
in generated code come from config paths. An edge parent → child carries the slot the child fills
(``arg0``, ``kw:lr``, ``item:3``, ``key:name``); a node reached twice (a YAML alias) is shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from .errors import Location


@dataclass
class Node:
    id: str
    kind: str  # call | var | dict | list | tuple | value
    loc: Location
    mode: str | None = None  # call: singleton | factory | partial | meta
    spec: str | None = None  # call: the callable spec as written
    name: str | None = None  # an explicit @name
    args: list[str] = field(default_factory=list)  # call: positional; list/tuple: items
    kwargs: dict[str, str] = field(default_factory=dict)  # call: keywords; dict: items
    key_locs: dict[str, Location] = field(default_factory=dict)  # where each keyword/key was set
    key_history: dict[str, list[Location]] = field(default_factory=dict)  # keys set more than once
    value: Any = None  # value: the scalar; var: the variable name
    default: str | None = None  # var: the default's node id

    def children(self) -> list[tuple[str, str]]:
        """(slot, child id) in order."""
        out = [(f"arg{i}", c) for i, c in enumerate(self.args)]
        out += [(f"kw:{k}", c) for k, c in self.kwargs.items()]
        if self.default is not None:
            out.append(("default", self.default))
        return out


class IRGraph:
    """The config as a graph: ``targets`` maps each root key to its node id."""

    def __init__(self) -> None:
        self.g = nx.MultiDiGraph()
        self.targets: dict[str, str] = {}
        self.definitions: dict[str, str] = {}

    def add(self, node: Node) -> Node:
        self.g.add_node(node.id, node=node)
        return node

    def link(self, node: Node, fresh: bool = False) -> None:
        """(Re)create the edges of a node from its ordered children (``fresh``: it has none yet)."""
        if not fresh:
            for _, child, key in list(self.g.out_edges(node.id, keys=True)):
                self.g.remove_edge(node.id, child, key)
        for slot, child in node.children():
            self.g.add_edge(node.id, child, key=slot)

    def node(self, node_id: str) -> Node:
        return self.g.nodes[node_id]["node"]

    def nodes(self) -> list[Node]:
        return [self.g.nodes[n]["node"] for n in self.g.nodes]

    def reachable(self, *roots: str, var_defaults: bool = True) -> list[str]:
        """The roots and every node below them, in a deterministic (children-first) order.
        With ``var_defaults=False`` a ``!var``'s default is not followed (it is not part of the
        body that generated code builds)."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(nid: str) -> None:
            if nid in seen:
                return
            seen.add(nid)
            node = self.node(nid)
            if var_defaults or node.kind != "var":
                for _, child in node.children():
                    visit(child)
            order.append(nid)

        for root in roots:
            visit(root)
        return order

    def uses(self, node_id: str, within: set[str] | None = None) -> int:
        """How many parent slots refer to the node (restricted to parents in ``within``)."""
        return sum(
            1
            for parent, _, _ in self.g.in_edges(node_id, keys=True)
            if within is None or parent in within
        )

    def restrict(self, targets: list[str]) -> "IRGraph":
        """The part of the graph that the given targets reach."""
        keep = {n for t in targets for n in self.reachable(self.targets[t])}
        other = self.copy()
        other.g.remove_nodes_from([n for n in list(other.g.nodes) if n not in keep])
        other.targets = {t: self.targets[t] for t in targets}
        other.definitions = {}
        return other

    def copy(self) -> "IRGraph":
        other = IRGraph()
        for n in self.nodes():
            other.add(
                replace(
                    n,
                    args=list(n.args),
                    kwargs=dict(n.kwargs),
                    key_locs=dict(n.key_locs),
                    key_history={k: list(v) for k, v in n.key_history.items()},
                )
            )
        for n in other.nodes():
            other.link(n)
        other.targets = dict(self.targets)
        other.definitions = dict(self.definitions)
        return other

    def to_data(self) -> dict:
        """A JSON-able description of the graph (for ``--dump-after`` and ``fgc graph``)."""
        nodes = {}
        for n in sorted(self.nodes(), key=lambda n: n.id):
            item: dict[str, Any] = {"kind": n.kind, "at": f"{n.loc}"}
            if n.kind == "call":
                item.update(mode=n.mode, spec=n.spec)
            if n.name:
                item["name"] = n.name
            if n.kind == "value":
                item["value"] = n.value
            if n.kind == "var":
                item["var"] = n.value
            if n.args:
                item["args"] = list(n.args)
            if n.kwargs:
                item["kwargs"] = dict(n.kwargs)
            if n.default is not None:
                item["default"] = n.default
            nodes[n.id] = item
        return {"targets": dict(self.targets), "nodes": nodes}

    def dump(self) -> str:
        return json.dumps(self.to_data(), indent=2, default=repr)
