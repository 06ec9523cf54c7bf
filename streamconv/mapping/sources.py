"""What a mapping table needs from a source checkpoint: named tensors as graph nodes.

The planner implements :class:`SourceTensors` over real files; tests can implement it over a dict.
"""

from __future__ import annotations

from typing import Protocol

from ..graph.node import Node


class SourceTensors(Protocol):
    def get(self, name: str) -> Node:
        """The node for source tensor ``name`` in its logical dtype (an FP8 weight arrives dequantized).
        Marks ``name`` (and its scales) consumed."""

    def has(self, name: str) -> bool:
        ...

    def drop(self, name: str, reason: str) -> None:
        """Declare that ``name`` is deliberately not converted, and why (coverage accounting)."""
