"""The plan: everything a conversion reads and writes, as plain data (frozen dataclasses <-> JSON).

A plan names its source files with their sizes and header digests (a stale plan is refused at run time),
every output file with its ordered tensors, each tensor a graph over the sources, and every source tensor
that is deliberately not converted, with the reason.  See docs/plan_format.md.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from dataclasses import dataclass, field

from .. import __version__
from ..errors import FormatError, GraphError, PlanError
from ..graph.codec import NodeTable, nodes_from_json
from ..graph.node import READS, Node, Op, toposort
from ..storage import fileio
from ..storage.registry import format_names

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SourceFile:
    name: str          # relative to the plan's source root
    size: int
    header_sha256: str  # digest of the file's header bytes ("" for files without one)


@dataclass(frozen=True)
class OutputTensor:
    group: str         # top-level container in the file ("model" for Megatron; "" for flat formats)
    name: str
    node: Node
    seq: int           # write-order group: tensors that share sources (replicas, TP slices) share a number

    @property
    def nbytes(self) -> int:
        return self.node.nbytes


@dataclass(frozen=True)
class OutputFile:
    path: str                      # relative to the plan's target root, '/'-separated
    format: str                    # a registered format name (streamconv.storage.registry.format_names())
    tensors: tuple[OutputTensor, ...] = ()
    attrs: tuple[tuple[str, object], ...] = ()   # scalar top-level entries (checkpoint_version, iteration)
    text: str | None = None        # content of a "text" file
    groups: tuple[str, ...] = ()   # top-level containers in order, listed even when empty (VPP chunks)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + len((self.text or "").encode())


@dataclass(frozen=True)
class Dropped:
    name: str
    reason: str


@dataclass(frozen=True)
class ReplicaCheck:
    """Copies of one tensor held by several source files (TP/EP replicas), which must be byte-identical.

    The executor compares them before writing anything when the plan carries checks."""

    label: str                  # what the copies are (an output tensor name or a source key)
    nodes: tuple[Node, ...]     # one read per copy
    where: tuple[str, ...]      # one label per copy (its source file), for the error message


@dataclass(frozen=True)
class Plan:
    kind: str                            # "hf2mcore" or "mcore2hf"
    source_root: str
    source_files: tuple[SourceFile, ...]
    target_root: str
    files: tuple[OutputFile, ...]
    dropped: tuple[Dropped, ...] = ()
    options: dict = field(default_factory=dict)   # the planner's inputs, for provenance and inspect
    checks: tuple[ReplicaCheck, ...] = ()          # replicas to compare before writing (mcore2hf)
    schema_version: int = SCHEMA_VERSION
    created_by: str = f"streamconv {__version__}"

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    # --- JSON ------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        table = NodeTable()
        files = []
        for f in self.files:
            entry = {"path": f.path, "format": f.format}
            if f.tensors:
                entry["tensors"] = [[t.group, t.name, table.add(t.node), t.seq] for t in f.tensors]
            if f.attrs:
                entry["attrs"] = [[k, _attr_to_json(v)] for k, v in f.attrs]
            if f.text is not None:
                entry["text"] = f.text
            if f.groups:
                entry["groups"] = list(f.groups)
            files.append(entry)
        out = {
            "schema_version": self.schema_version,
            "created_by": self.created_by,
            "kind": self.kind,
            "options": self.options,
            "source": {"root": self.source_root,
                       "files": [[s.name, s.size, s.header_sha256] for s in self.source_files]},
            "target": {"root": self.target_root, "files": files},
            "dropped": [[d.name, d.reason] for d in self.dropped],
            "nodes": table.rows,
        }
        if self.checks:
            out["checks"] = [[c.label, [table.add(n) for n in c.nodes], list(c.where)] for c in self.checks]
        return out

    @classmethod
    def from_json(cls, obj: dict, *, path: str = "plan") -> "Plan":
        """A plan from its JSON object.  Plans are untrusted input: every field is checked for its type, and a
        wrong one is one error naming the field (``target.files[3].tensors[0]: expected ...``).  Checks against
        the files a plan names are :func:`streamconv.plan.trust.audit`'s, at run time."""
        f = _Fields(path)
        f.obj(obj, "plan")
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"{path}: schema_version {version!r} (expected {SCHEMA_VERSION}). "
                            f"Re-create the plan with this streamconv version.")
        try:
            nodes = nodes_from_json(f.list(obj, "nodes"))
        except GraphError as exc:
            raise PlanError(f"{path}: nodes: {exc}") from None

        def node(i, where):
            if type(i) is not int or not 0 <= i < len(nodes):
                raise PlanError(f"{path}: {where}: {i!r} is not an index of the {len(nodes)}-node table.")
            return nodes[i]

        source = f.obj(obj.get("source"), "source")
        target = f.obj(obj.get("target"), "target")
        files = []
        for k, entry in enumerate(f.list(target, "files", "target")):
            where = f"target.files[{k}]"
            f.obj(entry, where)
            rel = _safe_relpath(f.str(entry, "path", where), path)
            fmt = f.str(entry, "format", where)
            if fmt not in format_names():
                raise PlanError(f"{path}: {rel}: unknown format {fmt!r} (expected one of {format_names()}).")
            tensors = []
            for j, row in enumerate(f.list(entry, "tensors", where, default=[])):
                w = f"{where}.tensors[{j}]"
                g, n, i, seq = f.row(row, (str, str, int, int), w, "[group, name, node, seq]")
                tensors.append(OutputTensor(g, n, node(i, w), seq))
            attrs = []
            for j, row in enumerate(f.list(entry, "attrs", where, default=[])):
                key, value = f.row(row, (str, object), f"{where}.attrs[{j}]", "[key, value]")
                attrs.append((key, _attr_from_json(value, f"{path}: {rel}")))
            groups = tuple(f.row(entry.get("groups", []), (str,) * len(entry.get("groups", []) or []),
                                 f"{where}.groups", "[group, ...]")) if "groups" in entry else ()
            text = entry.get("text")
            if text is not None and not isinstance(text, str):
                raise PlanError(f"{path}: {where}.text: expected a string, got {type(text).__name__}.")
            files.append(OutputFile(rel, fmt, tuple(tensors), tuple(attrs), text, groups))
        source_files = tuple(SourceFile(*f.row(row, (str, int, str), f"source.files[{j}]", "[name, size, digest]"))
                             for j, row in enumerate(f.list(source, "files", "source")))
        checks = []
        for j, row in enumerate(f.list(obj, "checks", default=[])):
            w = f"checks[{j}]"
            label, ids, where_ = f.row(row, (str, list, list), w, "[label, [node, ...], [where, ...]]")
            checks.append(ReplicaCheck(label, tuple(node(i, w) for i in ids),
                                       tuple(f.row(where_, (str,) * len(where_), w, "[where, ...]"))))
        options = obj.get("options") or {}
        if not isinstance(options, dict):
            raise PlanError(f"{path}: options: expected an object, got {type(options).__name__}.")
        created_by = obj.get("created_by", "")
        return cls(
            kind=f.str(obj, "kind"),
            source_root=f.str(source, "root", "source"),
            source_files=source_files,
            target_root=f.str(target, "root", "target"),
            files=tuple(files),
            dropped=tuple(Dropped(*f.row(row, (str, str), f"dropped[{j}]", "[name, reason]"))
                          for j, row in enumerate(f.list(obj, "dropped", default=[]))),
            options=dict(options),
            checks=tuple(checks),
            created_by=created_by if isinstance(created_by, str) else "",
        )

    def save(self, path: str) -> None:
        """Write the plan as JSON, atomically."""
        if os.path.isdir(path):
            raise PlanError(f"{path}: is a directory; give the plan a file name (e.g. {os.path.join(path, 'plan.json')}).")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise PlanError(f"{path}: directory {parent} does not exist. Create it or choose another path.")
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        fileio.atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            obj = fileio.read_json(path, MAX_PLAN_BYTES, what="plan")
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found.") from None
        except FormatError as exc:
            raise PlanError(str(exc)) from None
        return cls.from_json(obj, path=path)


MAX_PLAN_BYTES = 4 << 30   # a 671B plan is ~40 MB of JSON


class _Fields:
    """Type checks of a plan's JSON with errors naming the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, want: str, got) -> PlanError:
        return PlanError(f"{self.path}: {where}: expected {want}, got {type(got).__name__} {str(got)[:40]!r}.")

    def obj(self, value, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "a JSON object", value)
        return value

    def list(self, parent: dict, key: str, where: str | None = None, default=None) -> list:
        where = f"{where}.{key}" if where else key
        if key not in parent and default is not None:
            return default
        value = parent.get(key)
        if not isinstance(value, list):
            raise self.fail(where, "a list", value)
        return value

    def str(self, parent: dict, key: str, where: str | None = None) -> str:
        value = parent.get(key)
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}" if where else key, "a string", value)
        return value

    def row(self, value, types_: tuple, where: str, shape: str) -> list:
        if not isinstance(value, list) or len(value) != len(types_) or not all(
                t is object or (isinstance(v, t) and not (t is int and isinstance(v, bool)))
                for v, t in zip(value, types_)):
            raise self.fail(where, shape, value)
        return value


NAMESPACE = "__namespace__"   # JSON form of an argparse.Namespace attr: {"__namespace__": {field: scalar}}


def _attr_to_json(v):
    return {NAMESPACE: dict(vars(v))} if isinstance(v, argparse.Namespace) else v


def _attr_from_json(v, where: str):
    if isinstance(v, dict):
        fields = v.get(NAMESPACE)
        if set(v) != {NAMESPACE} or not isinstance(fields, dict) or not all(
                isinstance(x, (int, float, str, bool, type(None))) for x in fields.values()):
            raise PlanError(f"{where}: attr {v!r} is neither a scalar nor a {{{NAMESPACE!r}: {{field: scalar}}}} "
                            f"object.")
        return argparse.Namespace(**fields)
    return v


def _safe_relpath(p: str, plan_path: str) -> str:
    """Output paths are relative and stay inside the target root: no absolute paths, no '..'."""
    if not isinstance(p, str) or not p or p.startswith("/") or "\\" in p or os.path.isabs(p):
        raise PlanError(f"{plan_path}: output path {p!r} must be relative to the target root.")
    norm = posixpath.normpath(p)
    if norm != p or norm.startswith("../") or norm == ".." or norm == ".":
        raise PlanError(f"{plan_path}: output path {p!r} escapes or is not normalised; refusing the plan.")
    return p


def sources_read(plan: Plan, roots) -> tuple[SourceFile, ...]:
    """The plan's source files the graphs ``roots`` read: each plain read's file, and every file of each chunked
    array they read (an array is a directory of files: its metadata and its chunks or shards).  What a part of
    the plan (one rank, one host's files) must list so the audit and the staleness checks cover its reads."""
    reads = [n for n in toposort(list(roots)) if n.op in READS]
    files = {n.arg.file for n in reads if n.op is Op.READ}
    arrays = tuple({n.arg.file + "/" for n in reads if n.op is not Op.READ})
    return tuple(s for s in plan.source_files if s.name in files or s.name.startswith(arrays))
