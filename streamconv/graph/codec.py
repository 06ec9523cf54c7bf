"""Graphs as JSON: a node table in topological order, sources by index.

    {"nodes": [{"op": "read", "arg": {...}, "src": [], "dtype": "bfloat16", "shape": [256, 64]},
               {"op": "slice", "arg": {"offsets": [0, 0], "lengths": [128, 64]}, "src": [0], ...}],
     "roots": [1]}

``dtype`` and ``shape`` are redundant (they are re-inferred on load) and kept for people reading plans;
a disagreement means the file was edited or written by an incompatible version, and is refused.
"""

from __future__ import annotations

from ..errors import GraphError
from .node import Node, Op, arg_from_json, arg_to_json, make, toposort


class NodeTable:
    """Assigns dense indices to nodes in topological order (shared sub-graphs stored once)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.rows: list[dict] = []

    def add(self, root: Node) -> int:
        for node in toposort([root]):
            if node.key not in self.index:
                self.index[node.key] = len(self.rows)
                self.rows.append({
                    "op": node.op.value,
                    "arg": arg_to_json(node.arg),
                    "src": [self.index[s.key] for s in node.src],
                    "dtype": node.dtype,
                    "shape": list(node.shape),
                })
        return self.index[root.key]


def nodes_from_json(rows: list[dict]) -> list[Node]:
    """Rebuild and re-check every node of a table; sources must precede their users."""
    nodes: list[Node] = []
    for i, row in enumerate(rows):
        try:
            op = Op(row["op"])
            src = tuple(nodes[j] for j in row["src"])
            if any(j >= i or j < 0 for j in row["src"]):
                raise GraphError("sources must come earlier in the table")
            node = make(op, src, arg_from_json(op, row["arg"]))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise GraphError(f"node {i}: malformed ({exc.__class__.__name__}: {exc})") from None
        except GraphError as exc:
            raise GraphError(f"node {i}{_reads_of(nodes, row)}: {exc}") from None
        if node.dtype != row.get("dtype") or list(node.shape) != list(row.get("shape", ())):
            raise GraphError(f"node {i}{_reads_of(nodes, row)}: recorded {row.get('dtype')}{row.get('shape')} but "
                             f"the op gives {node.dtype}{list(node.shape)}; the plan was edited or is from another "
                             f"version")
        nodes.append(node)
    return nodes


def _reads_of(nodes: list[Node], row) -> str:
    """`` (reading model.layers.0.q_a_proj.weight, ...)``: the tensors a bad node depends on, so an error names
    them rather than only an index."""
    try:
        srcs = [nodes[j] for j in row.get("src", ()) if type(j) is int and 0 <= j < len(nodes)]
        names = []
        if row.get("op") == "read" and isinstance(row.get("arg"), dict):
            names.append(str(row["arg"].get("tensor")))
        names += [n.arg.tensor for n in toposort(srcs) if n.op is Op.READ]
    except Exception:  # noqa: BLE001  (only a hint for a message)
        return ""
    names = list(dict.fromkeys(names))
    return f" (reading {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else ""


def graph_to_json(roots: list[Node]) -> dict:
    table = NodeTable()
    ids = [table.add(r) for r in roots]
    return {"nodes": table.rows, "roots": ids}


def graph_from_json(obj: dict) -> list[Node]:
    nodes = nodes_from_json(obj["nodes"])
    bad = [i for i in obj["roots"] if not (type(i) is int and 0 <= i < len(nodes))]
    if bad:
        raise GraphError(f"roots {bad} are not indices of the {len(nodes)}-node table; the graph was edited "
                         f"or is from another version")
    return [nodes[i] for i in obj["roots"]]
