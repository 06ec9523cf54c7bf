"""The storage-format interface: what every file format streamconv reads or writes provides.

A format is one object, a subclass of :class:`TensorFormat`, registered by name in
:mod:`streamconv.storage.registry`.  Plans name formats by that name; the planner's source adapters, the
executor and ``verify`` reach the format only through this interface, so a new format (zarr, torch_dist)
is one module plus one ``register_format`` line (see docs/architecture.md, "Adding a storage format").

The small neutral types below are what crosses the interface; a format keeps its own details in its layout
object and in :attr:`IndexEntry.storage_data`.  Nothing here imports ``plan``: the executor turns a plan's
output file into :class:`TensorEntry` rows itself.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, NamedTuple, Sequence

from .. import types

Piece = tuple[int, int, int, int]  # (entry index, byte offset in the entry, length, crc32 of the piece)
Attrs = tuple[tuple[str, Any], ...]


class TensorEntry(NamedTuple):
    """One tensor a file is to hold: ``group`` is its top-level container (``""`` for flat formats), ``name``
    its name inside it, ``dtype`` our dtype name (``"bfloat16"``), ``shape`` its shape."""

    group: str
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class IndexEntry:
    """One tensor found in a file by :meth:`TensorFormat.index`, without reading its data.

    ``start`` is the absolute byte offset of the tensor's first element.  When ``row_major`` holds, the
    tensor's bytes are exactly ``[start, end)`` in row-major order, which is what a ``read`` node reads;
    ``stride`` (in elements) says how it is stored otherwise.  ``storage_data`` is the format's own record
    of the tensor (opaque to callers other than the format's adapters, like DCP's ``storage_data``).
    """

    group: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stride: tuple[int, ...]
    storage_data: Any = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return types.nbytes(self.dtype, self.shape)

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    @property
    def row_major(self) -> bool:
        return is_row_major(self.shape, self.stride)


@dataclass(frozen=True)
class FileIndex:
    """What :meth:`TensorFormat.index` finds in one file: its size, layout digest, tensors in file order, and
    its top-level scalar attributes (safetensors ``__metadata__``, a .pt file's ``iteration``...)."""

    path: str
    size: int
    digest: str
    tensors: tuple[IndexEntry, ...]
    attrs: Attrs = ()


class FileCheck(NamedTuple):
    """What :meth:`TensorFormat.check_file` found: how many tensor records it checked, and one line per
    problem (empty: the file is intact)."""

    records: int
    problems: list[str]


def row_major_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """The contiguous stride (elements) of ``shape``, as torch computes it (a 0-size dim counts as 1)."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def is_row_major(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether ``stride`` (elements) is the contiguous row-major stride of ``shape`` (size-1 dims are free)."""
    expect = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n > 1 and s != expect:
            return False
        expect *= n
    return True


class TensorFormat(abc.ABC):
    """A file format: sniffing, digests, reading the index, the stateless write protocol, and checks.

    Modelled on torch.distributed.checkpoint's ``StorageWriter``/``StorageReader``.  The steps, in the order
    a conversion uses them, with their callers:

    1. :meth:`sniff` (class level; the registry, for ``verify_dir`` and source digests) says whether a file
       starting with given bytes is of this format; :meth:`digest` (planner when it records a source;
       executor when it checks that the source did not change) returns a digest of the file's layout.
    2. :meth:`index` (planner, through its source adapters) lists the file's tensors with their dtypes,
       shapes and byte offsets without reading tensor data.
    3. :meth:`compute_layout` (executor, and ``verify``) fixes every byte offset of an output file from
       neutral :class:`TensorEntry` rows alone, before any data exists.
    4. :meth:`create` (executor, once per file, before any write) makes the temporary file.
    5. :meth:`write_piece` (any worker thread or process, any number of times, in any order) writes bytes
       of one entry at an offset and returns a :data:`Piece` record.
    6. :meth:`finish` (executor, once, after every write returned) checks that the pieces tile every entry,
       completes the file, renames it into place and returns one CRC32 per entry: what the run journal holds.
       :meth:`abort` (executor, after a failure, instead of finish) removes the temporary file.
    7. :meth:`check_file` (``verify``) re-checks a finished file against its journal record and, when the
       plan is at hand, against the layout the plan implies.

    What must hold:

    * Deterministic: equal inputs give equal layouts, digests and bytes; the file is byte-identical
      whatever the order and the process of the ``write_piece`` calls.
    * Stateless: a format object holds no per-file state; everything a step needs is in its arguments
      (path, layout, pieces).  Any step may run in any thread or process: layouts are frozen, hashable and
      picklable, and so is the format object (tasks may also pass its name and call
      :func:`streamconv.storage.registry.get_format`).
    * Atomic: the final name appears only when ``finish`` has written every byte durably
      (``fileio.temp_name`` until then); a crashed run never looks complete.
    * Idempotent where retries happen: a duplicate piece (a retried task) counts once in ``finish``; ``abort``
      with nothing to remove is a no-op; after ``finish`` failed on a bad tiling, the missing pieces can be
      written and ``finish`` called again.
    * Errors are one line naming the file (and tensor): reading problems are :class:`FormatError`, layout
      problems a :class:`ValidationError` listing them all, write problems :class:`ExecutionError`.

    Capabilities are class attributes, so callers never find them out by trial: :attr:`name`,
    :attr:`is_text`, :attr:`supports_float8`, :attr:`supports_groups`, :attr:`supports_attrs`.
    """

    #: the name plans use for this format (``OutputFile.format``)
    name: ClassVar[str] = ""
    #: a small text file (config, index, tracker): no tensors; its content is the ``text`` of the layout
    is_text: ClassVar[bool] = False
    #: holds float8 tensors
    supports_float8: ClassVar[bool] = True
    #: tensors live in named top-level containers (``TensorEntry.group`` non-empty, e.g. ``model0``); if
    #: False the format is flat and every group must be ``""``
    supports_groups: ClassVar[bool] = False
    #: holds top-level scalar attributes next to the tensors (``attrs`` of :meth:`compute_layout`)
    supports_attrs: ClassVar[bool] = False
    #: how many leading bytes :meth:`sniff` needs
    sniff_bytes: ClassVar[int] = 16

    # --- 1. recognising files ---------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def sniff(cls, head: bytes) -> bool:
        """Whether a file whose first bytes are ``head`` (up to :attr:`sniff_bytes`, fewer for a short file)
        belongs to this format.  Cheap and exclusive: no two registered formats claim the same file."""

    @abc.abstractmethod
    def digest(self, path: str) -> str:
        """A digest of the file's layout (header, directory: not the tensor data), stable while the file is
        unchanged; the plan records it, and the executor refuses to run when it differs.  Cheap: reads only
        the header.  Raises :class:`FormatError` when the file cannot be read as this format."""

    # --- 2. reading -------------------------------------------------------------------------------------------
    def index(self, path: str) -> FileIndex:
        """The tensors of the file at ``path`` in file order, with their dtypes, shapes and byte offsets, and
        its attrs and digest, read from its header or directory alone (no tensor data is read).

        Raises:
            FormatError: one line naming ``path`` for a missing, truncated or malformed file.
        """
        raise NotImplementedError(f"{self.name}: this format cannot be read (it has no index).")

    def read_entry(self, path: str, layout: Any, index: int):
        """The raw bytes (uint8 numpy array) of entry ``index`` of the finished file at ``path`` written with
        ``layout``, as they were written (``verify --rederive`` compares them).  Default: the entry's span;
        formats that transform bytes on the way to disk (compression) decode them."""
        from . import fileio

        start, end = layout.spans[index]
        return fileio.read_range(path, start, end - start)

    def read_region(self, path: str, dtype: str, shape: tuple[int, ...], offsets: tuple[int, ...],
                    lengths: tuple[int, ...]):
        """Elements ``[offsets, offsets + lengths)`` of the tensor stored at ``path`` (a chunked format's array:
        a directory of chunk files) as a torch tensor of ``dtype``, reading only the chunks the region overlaps.
        The kernel of the graph's ``read_chunked`` op (any worker, any thread).  Formats whose tensors are
        byte ranges of one file are read by the ``read`` op instead and need not implement it.

        Raises:
            FormatError: one line naming the file when the tensor is missing, changed or damaged.
        """
        raise NotImplementedError(f"{self.name}: this format has no chunked reads (use the read op).")

    # --- 3-7. writing and checking ----------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_layout(self, entries: Iterable[TensorEntry], attrs: Iterable[tuple[str, Any]] = (),
                       groups: Iterable[str] = (), *, text: str | None = None) -> Any:
        """Fix every byte of a file holding ``entries`` (in this order) and ``attrs``, before any data exists.

        Args:
            entries: the tensors, :class:`TensorEntry` rows (or 4-tuples).
            attrs: top-level scalars, ``(key, value)`` pairs, for formats that :attr:`supports_attrs`.
            groups: containers that come first, in this order, even when empty (formats that
                :attr:`supports_groups`).
            text: the content of a text format's file; None for tensor formats.

        Returns:
            A frozen, hashable, picklable layout with ``size`` (bytes of the file), ``entries`` and ``spans``
            (the absolute ``(start, end)`` of each entry's bytes).

        Raises:
            ValidationError: listing every problem (unknown dtype, duplicate name, unsupported group...),
                without the file's path: the caller adds it.
        """

    @abc.abstractmethod
    def create(self, path: str, layout: Any) -> None:
        """Make ``fileio.temp_name(path)`` at its final size (an old temporary file is truncated)."""

    @abc.abstractmethod
    def write_piece(self, path: str, layout: Any, index: int, data, offset: int = 0) -> Piece:
        """Write ``data`` (a tensor of the entry's dtype, or raw bytes) at byte ``offset`` of entry ``index``
        and return ``(index, offset, length, crc32)``.  Thread- and process-safe."""

    @abc.abstractmethod
    def finish(self, path: str, layout: Any, pieces: Iterable[Piece]) -> list[int]:
        """Check that ``pieces`` tile every entry (raising :class:`ValidationError` before touching the file
        if not), complete the file, fsync it and rename it into place.  Returns the CRC32s the run journal
        records for the file (one per tensor entry; for a text file, one of its content)."""

    @abc.abstractmethod
    def abort(self, path: str) -> None:
        """Remove the temporary file, if any. The final name is never touched."""

    @abc.abstractmethod
    def check_file(self, path: str, record: dict, layout: Any = None) -> FileCheck:
        """Check a finished file against ``record`` (its journal line: ``size``, ``crc32``) and, when given,
        the ``layout`` its plan implies.  Never raises for a damaged file: every problem is one line in the
        returned :class:`FileCheck`, naming ``path``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
