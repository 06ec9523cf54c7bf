"""The registry of storage formats: plans name a format, and this maps the name to its object.

    >>> get_format("safetensors").supports_groups
    False
    >>> format_names()
    ('megatron_pt', 'safetensors', 'text', 'zarr')

A new format is registered with one line, ``register_format(MY_FORMAT)``, at the bottom of this module for
a built-in one; the conformance suites (:mod:`streamconv.testing`) then run on it, because
``tests/conformance/test_formats.py`` is parametrized over :func:`format_names`.  Sniffing
(:func:`format_of_file`) asks each format in registration order; sniffs must be exclusive (the reader suite
checks that no format claims another's files), so the order decides nothing.
"""

from __future__ import annotations

import os
import stat

from ..errors import FormatError, ValidationError
from .base import TensorFormat
from .megatron_pt import MEGATRON_PT
from .safetensors import SAFETENSORS
from .text import TEXT
from .zarr_shard import ZARR

_FORMATS: dict[str, TensorFormat] = {}


def register_format(fmt: TensorFormat) -> TensorFormat:
    """Make ``fmt`` known under ``fmt.name``. Registering the same object again is a no-op; returns ``fmt``."""
    if not isinstance(fmt, TensorFormat):
        raise ValidationError(f"register_format: {fmt!r} is a {type(fmt).__name__} (expected a TensorFormat "
                              f"instance). Subclass streamconv.storage.base.TensorFormat.")
    name = fmt.name
    if type(name) is not str or not name or not name.isidentifier():
        raise ValidationError(f"register_format: name {name!r} of {type(fmt).__name__} (expected an identifier "
                              f"such as 'zarr_v3'). Set the class attribute name.")
    old = _FORMATS.get(name)
    if old is not None and old is not fmt:
        raise ValidationError(f"register_format: {name!r} is already registered ({old!r}). Choose another name.")
    _FORMATS[name] = fmt
    return fmt


def get_format(name: str) -> TensorFormat:
    """The format registered as ``name``; an unknown name raises one line listing the known ones."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValidationError(f"format {name!r}: not registered (expected one of {', '.join(_FORMATS)}). Fix "
                              f"the plan, or register the format (streamconv.storage.registry.register_format)."
                              ) from None


def format_names() -> tuple[str, ...]:
    """Every registered format name, in registration order."""
    return tuple(_FORMATS)


def format_of_file(path: str) -> TensorFormat | None:
    """The format whose :meth:`~TensorFormat.sniff` claims the file at ``path``, or None when none does."""
    want = max((f.sniff_bytes for f in _FORMATS.values()), default=0)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise FormatError(f"{path}: not a regular file (a directory, FIFO or device); expected a tensor file.")
        with open(path, "rb", buffering=0) as fh:  # unbuffered: read the sniff bytes, not a 4 KiB buffer
            head = fh.read(want)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror or exc}).") from None
    for fmt in _FORMATS.values():
        if fmt.sniff(head[: fmt.sniff_bytes]):
            return fmt
    return None


def digest_of_file(path: str) -> str:
    """The layout digest of a source file by its sniffed format ("" when no format claims it): what a plan
    records per source file, and what the executor compares to find stale sources."""
    fmt = format_of_file(path)
    return fmt.digest(path) if fmt is not None else ""


# --- built-in formats --------------------------------------------------------------------------------------------
register_format(MEGATRON_PT)
register_format(SAFETENSORS)
register_format(TEXT)
register_format(ZARR)
