"""Small text files (config.json, the HF index, Megatron's tracker) as a format: no tensors, one content.

They go through the same steps as tensor files (layout, create, finish, abort, check), so the executor and
``verify`` need no branch for them; :attr:`TextFormat.is_text` tells the executor to write them after every
tensor file (the last one, a tracker or an index, marks the output complete).
"""

from __future__ import annotations

import codecs
import zlib
from dataclasses import dataclass
from typing import Iterable

from ..errors import ExecutionError, FormatError, ValidationError
from . import fileio
from . import pieces as _pieces
from .base import FileCheck, Piece, TensorFormat


@dataclass(frozen=True)
class TextLayout:
    """A text file's layout: its whole content (UTF-8 on disk)."""

    text: str

    @property
    def data(self) -> bytes:
        return self.text.encode()

    @property
    def size(self) -> int:
        return len(self.data)

    entries = ()
    spans = ()


class TextFormat(TensorFormat):
    """A small UTF-8 text file written whole and atomically; its journal record is one CRC of the content."""

    name = "text"
    is_text = True
    supports_float8 = False   # no tensors at all; no groups or attrs either (the defaults)
    sniff_bytes = 64

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        # UTF-8 without NUL: never a safetensors or zip file, whose first 8 bytes hold NULs
        if b"\0" in head:
            return False
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
        except UnicodeDecodeError:
            return False
        return True

    def digest(self, path: str) -> str:
        return ""  # a text file has no layout apart from its content

    def compute_layout(self, entries, attrs=(), groups=(), *, text=None) -> TextLayout:
        problems = []
        if list(entries) or list(groups) or list(attrs):
            problems.append("tensors, groups or attrs given (expected none). A text file holds only its text.")
        if text is not None and not isinstance(text, str):
            problems.append(f"text of type {type(text).__name__} (expected str).")
        if problems:
            raise ValidationError(problems)
        return TextLayout(text or "")

    def create(self, path: str, layout: TextLayout) -> None:
        _pieces.create_temp(path, layout.size, layout.data)

    def write_piece(self, path: str, layout: TextLayout, index: int, data, offset: int = 0) -> Piece:
        raise ExecutionError(f"{path}: a text file has no tensor entries (got a piece of entry {index}). Its "
                             f"content is written whole by create().")

    def finish(self, path: str, layout: TextLayout, pieces: Iterable[Piece] = ()) -> list[int]:
        _pieces.commit(path, layout.size)
        return [zlib.crc32(layout.data)]

    def abort(self, path: str) -> None:
        _pieces.abort(path)

    def check_file(self, path: str, record: dict, layout: TextLayout | None = None) -> FileCheck:
        """With a layout: the content equals the plan's.  Without: the whole file's CRC equals the journal's."""
        try:
            if layout is not None:
                with open(path, "rb") as fh:
                    content = fh.read()
                if content != layout.data:
                    return FileCheck(0, [f"{path}: content {content[:20]!r} differs from the plan's "
                                         f"{layout.text!r}."])
                return FileCheck(0, [])
            if [fileio.crc32_of_range(path, 0, record["size"])] != record.get("crc32"):
                return FileCheck(0, [f"{path}: checksum differs from the journal."])
        except (OSError, FormatError, KeyError) as exc:
            return FileCheck(0, [f"{path}: cannot be read back ({exc}). Run the plan again."])
        return FileCheck(0, [])


TEXT = TextFormat()
