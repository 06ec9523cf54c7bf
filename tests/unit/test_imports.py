"""The import direction of docs style.md "Our layout", checked on the source with ast (nothing is imported).

    types/errors <- graph <- layout <- mapping <- models;  storage imports only types/errors (testing, its
    conformance suites, only storage, types and errors);
    plan is where models meet storage;  execute and loader never import mapping or models;  cli may import anything.

Every import counts, including ones inside functions and ``TYPE_CHECKING`` blocks.  ``streamconv`` itself
(``from .. import __version__``) may be imported by anyone, so its ``__init__`` must import no submodule.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "streamconv"

# layer -> the other layers it may import (a layer may always import itself); None: anything
ALLOWED: dict[str, set[str] | None] = {
    "types": set(),
    "errors": set(),
    "graph": {"types", "errors"},
    "layout": {"types", "errors", "graph"},
    "mapping": {"types", "errors", "graph", "layout"},
    "models": {"types", "errors", "graph", "layout", "mapping"},
    "storage": {"types", "errors"},
    "testing": {"types", "errors", "storage"},   # the conformance suites shipped for format authors
    "plan": {"types", "errors", "graph", "layout", "mapping", "models", "storage"},
    "synth": {"types", "errors", "storage", "layout", "mapping", "models", "execute"},
    "data": {"types", "errors", "storage"},
    "cli": None,
    "launch": {"errors", "loader"},              # python -m streamconv.launch: the Megatron hook, then the script
    "__main__": {"cli"},
}
# layers with only a deny list (the brief for them is "never X")
FORBIDDEN = {
    "execute": {"mapping", "models", "cli", "synth"},
    "loader": {"mapping", "models", "cli", "synth"},
}
NO_MODEL_NAMES = ["graph", "layout", "mapping", "storage", "testing", "execute", "loader", "plan"]
FAMILY_NAMES = ("deepseek", "qwen")
# The FP8 block edge is defined once, in streamconv/models/quant.py; a literal 128 in these layers is that
# knowledge leaking (code only: comments and docstrings may say "128x128").
NO_BLOCK_LITERAL = ["plan", "execute", "storage", "testing", "graph", "layout", "mapping"]
BLOCK_LITERAL_ALLOWED = {
    "streamconv.execute.copy": "rows per step of the banded copy, sized for the L2 cache, not the FP8 block",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    """``streamconv.graph.node`` -> ``graph``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every streamconv module that ``module``'s source imports (absolute and relative forms)."""
    out: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "streamconv")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "streamconv":
                continue
            out.add(target)
            for a in node.names:  # ``from . import commands`` imports the submodule streamconv.cli.commands
                if _is_module(f"{target}.{a.name}"):
                    out.add(f"{target}.{a.name}")
    return out


def _sources() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        found[module_name(path)] = (path, path.name == "__init__.py")
    return found


SOURCES = _sources()
GRAPH = {m: imports_of(p.read_text(), m, pkg) for m, (p, pkg) in SOURCES.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        src = layer(mod)
        for tgt in sorted(targets):
            dst = layer(tgt)
            if dst in ("", src):
                continue
            allowed = ALLOWED.get(src, ...)
            if allowed is ...:
                if dst in FORBIDDEN.get(src, set()):
                    bad.append(f"{mod} imports {tgt} ({src} must never import {dst})")
                elif src not in FORBIDDEN:
                    bad.append(f"{mod} imports {tgt} (no rule for layer {src!r}; add it to ALLOWED)")
            elif allowed is not None and dst not in allowed:
                bad.append(f"{mod} imports {tgt} ({src} may import only {sorted(allowed) or 'nothing'})")
    return bad


def test_walker_sees_the_package():
    assert {"streamconv.graph.node", "streamconv.models.deepseek_v3", "streamconv.types"} <= set(GRAPH)
    # known edges, in every spelling: relative module, relative package + name, absolute
    assert "streamconv.mapping.rules" in GRAPH["streamconv.models.deepseek_v3"]
    assert "streamconv.graph.node" in GRAPH["streamconv.graph.codec"]
    assert "streamconv.types" in GRAPH["streamconv.graph.node"]
    assert imports_of("from ..graph import node\nimport streamconv.models.deepseek_v3 as m\n",
                      "streamconv.execute.x", False) == {"streamconv.graph", "streamconv.graph.node",
                                                         "streamconv.models.deepseek_v3"}
    assert imports_of("from . import rules\n", "streamconv.mapping", True) == {"streamconv.mapping",
                                                                               "streamconv.mapping.rules"}


@pytest.mark.parametrize("edge, layer_rule", [
    (("streamconv.graph.node", "streamconv.layout.parallel"), "graph"),
    (("streamconv.storage.safetensors", "streamconv.graph.node"), "storage"),
    (("streamconv.execute.kernels", "streamconv.mapping.rules"), "execute"),
    (("streamconv.loader", "streamconv.models.deepseek_v3"), "loader"),
    (("streamconv.types", "streamconv.errors"), "types"),
    (("streamconv.synth", "streamconv.plan.planner"), "synth"),
    (("streamconv.testing.reader_suite", "streamconv.plan.plan"), "testing"),
    (("streamconv.layout.parallel", "streamconv.mapping.rules"), "layout"),
    (("streamconv.newlayer.x", "streamconv.graph.node"), "unknown layer"),
])
def test_checker_catches_a_violation(edge, layer_rule):
    mod, tgt = edge
    assert violations({mod: {tgt}}), f"{layer_rule}: {mod} -> {tgt} should be refused"


def test_import_direction():
    assert violations(GRAPH) == []


def test_package_root_imports_nothing():
    assert GRAPH["streamconv"] == set(), "streamconv/__init__.py is imported by every layer; keep it bare"


def _closure(start: str, stop: frozenset[str] = frozenset()) -> set[str]:
    """Modules loaded by importing ``start``: its imports, and every parent package of each, transitively
    (not following the imports of modules in ``stop``)."""
    seen, stack = set(), [start]
    while stack:
        mod = stack.pop()
        if mod in seen or mod not in GRAPH or mod in stop:
            continue
        seen.add(mod)
        stack.extend(GRAPH[mod])
        parts = mod.split(".")
        stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return seen


# The loader plans one rank in-process, from an HF directory or from an mcore checkpoint (resharded on load): it
# asks the planners (the one place model tables meet storage, as the CLI does) and holds no model knowledge
# itself.  No other path from it reaches mapping or models.
PLANNERS = frozenset({"streamconv.plan.planner", "streamconv.plan.mcore2mcore", "streamconv.plan.mcore2hf"})
BRIDGES = {"loader": PLANNERS}


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if layer(m) in ("execute", "loader")))
def test_execute_and_loader_never_reach_models_transitively(mod):
    reached = {layer(m) for m in _closure(mod, BRIDGES.get(layer(mod), frozenset()))}
    assert not reached & {"mapping", "models"}, f"{mod} loads {sorted(reached & {'mapping', 'models'})}"


def test_the_loader_bridge_is_only_the_planners():
    direct = {t for m in GRAPH if layer(m) == "loader" for t in GRAPH[m] if layer(t) == "plan"}
    assert direct <= {"streamconv.plan", "streamconv.plan.plan"} | PLANNERS, direct


# Known violations of the strict "no model names" rule, all in docstrings/comments.  strict=True: once a
# module is cleaned this test XPASSes and fails, so remove its entry.
KNOWN_MODEL_NAMES: dict[str, str] = {}


def _no_model_params():
    out = []
    for mod in sorted(GRAPH):
        if layer(mod) in NO_MODEL_NAMES:
            marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_MODEL_NAMES[mod])]
                     if mod in KNOWN_MODEL_NAMES else [])
            out.append(pytest.param(mod, marks=marks, id=mod))
    return out


@pytest.mark.parametrize("mod", _no_model_params())
def test_no_model_names_outside_models(mod):
    path, _ = SOURCES[mod]
    text = path.read_text().lower()
    for name in FAMILY_NAMES:
        assert name not in text, f"{os.path.relpath(path, PKG.parent)} mentions {name}: model knowledge " \
                                 f"belongs in streamconv/models/"


def block_literals(source: str) -> list[int]:
    """Lines of ``source`` whose code (not comments or strings) holds the integer literal 128."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NUMBER:
            try:
                value = ast.literal_eval(tok.string)
            except ValueError:
                continue
            if value == 128:
                out.append(tok.start[0])
    return out


def test_block_literal_finder():
    assert block_literals("x = (128, 128)\n# 128x128 blocks\ny = '128'\nz = 0x80\n") == [1, 1, 4]
    assert block_literals('"""128 in a docstring"""\nw = 1280\n') == []


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if layer(m) in NO_BLOCK_LITERAL))
def test_no_fp8_block_literal_outside_models(mod):
    path, _ = SOURCES[mod]
    lines = block_literals(path.read_text())
    if mod in BLOCK_LITERAL_ALLOWED:
        assert lines, f"{mod} no longer holds a 128; drop its BLOCK_LITERAL_ALLOWED entry"
        return
    assert not lines, f"{os.path.relpath(path, PKG.parent)}:{lines[0]}: literal 128; the FP8 block size comes " \
                      f"from the model family's quant scheme (streamconv/models/quant.py)"
