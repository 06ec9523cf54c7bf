"""A plan's output file as its storage format sees it: the one place the executor turns an ``OutputFile``
into the neutral rows (:class:`~streamconv.storage.base.TensorEntry`) a format lays out.

Storage never imports ``plan``; everything format-specific happens behind
:func:`streamconv.storage.registry.get_format`.
"""

from __future__ import annotations

from ..errors import ValidationError
from ..plan.plan import OutputFile
from ..storage.base import TensorEntry, TensorFormat
from ..storage.registry import get_format


def format_of(f: OutputFile) -> TensorFormat:
    return get_format(f.format)


def entries_of(f: OutputFile) -> list[TensorEntry]:
    return [TensorEntry(t.group, t.name, t.node.dtype, tuple(t.node.shape)) for t in f.tensors]


def layout_of(f: OutputFile):
    """The layout of ``f`` in its format (every byte offset, fixed by the plan alone); layout problems are
    raised once, each naming the file."""
    try:
        return format_of(f).compute_layout(entries_of(f), f.attrs, f.groups, text=f.text)
    except ValidationError as exc:  # name the file: the layout alone does not know it
        raise ValidationError([f"{f.path}: {p}" for p in exc.problems]) from None
