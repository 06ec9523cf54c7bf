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
from ..errors import GraphError, PlanError
from ..graph.codec import NodeTable, nodes_from_json
from ..graph.node import Node
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
        if not isinstance(obj, dict):
            raise PlanError(f"{path}: not a streamconv plan (expected a JSON object).")
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"{path}: schema_version {version!r} (expected {SCHEMA_VERSION}). "
                            f"Re-create the plan with this streamconv version.")
        try:
            nodes = nodes_from_json(obj["nodes"])
            files = []
            for f in obj["target"]["files"]:
                rel = _safe_relpath(f["path"], path)
                if f["format"] not in format_names():
                    raise PlanError(f"{path}: {rel}: unknown format {f['format']!r} (expected one of "
                                    f"{format_names()}).")
                tensors = tuple(OutputTensor(g, n, nodes[i], int(seq)) for g, n, i, seq in f.get("tensors", ()))
                attrs = tuple((k, _attr_from_json(v, rel)) for k, v in f.get("attrs", ()))
                groups = tuple(f.get("groups", ()))
                if not all(isinstance(g, str) for g in groups):
                    raise PlanError(f"{path}: {rel}: groups must be strings.")
                files.append(OutputFile(rel, f["format"], tensors, attrs, f.get("text"), groups))
            return cls(
                kind=obj["kind"],
                source_root=obj["source"]["root"],
                source_files=tuple(SourceFile(n, int(s), h) for n, s, h in obj["source"]["files"]),
                target_root=obj["target"]["root"],
                files=tuple(files),
                dropped=tuple(Dropped(n, r) for n, r in obj.get("dropped", ())),
                options=dict(obj.get("options") or {}),
                checks=tuple(ReplicaCheck(label, tuple(nodes[i] for i in ids), tuple(where))
                             for label, ids, where in obj.get("checks", ())),
                created_by=obj.get("created_by", ""),
            )
        except GraphError as exc:
            raise PlanError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PlanError(f"{path}: malformed plan ({exc.__class__.__name__}: {exc}).") from None

    def save(self, path: str) -> None:
        """Write the plan as JSON, atomically."""
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        fileio.atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read())
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: not valid JSON ({exc}).") from None
        return cls.from_json(obj, path=path)


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
