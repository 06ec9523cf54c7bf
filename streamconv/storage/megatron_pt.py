"""Megatron's legacy checkpoint file (``model_optim_rng.pt``, a torch zip) as a :class:`TensorFormat`.

Writing is :mod:`streamconv.storage.torchzip` (our streaming zip64 writer), reading is
:mod:`streamconv.storage.torchzip_reader` (zip directory and restricted unpickler); this module joins them
under the name plans use, ``"megatron_pt"``.  A file holds ``{group: OrderedDict(name -> tensor), ...,
**attrs}``: Megatron keeps a model's modules in the group ``model``, or ``model0``, ``model1``... with
virtual pipeline chunks (:func:`is_model_group`); the attrs are scalars such as ``checkpoint_version``.
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterable

from ..errors import FormatError, ValidationError
from . import pieces as _pieces
from . import torchzip
from . import torchzip_reader as ptr
from .base import FileCheck, FileIndex, IndexEntry, Piece, TensorFormat

_SCALARS = (int, float, str, bool, type(None))


def is_model_group(key: str) -> bool:
    """Whether a top-level key of a Megatron checkpoint holds model weights: ``model`` or ``model<N>``."""
    return key == "model" or (key.startswith("model") and key[5:].isdigit())


class MegatronPtFormat(TensorFormat):
    """The torch-zip ``.pt`` file: tensors at ``obj[group][name]`` (groups required), scalar attrs."""

    name = "megatron_pt"
    supports_float8 = True   # stored as UntypedStorage + _rebuild_tensor_v3
    supports_groups = True
    supports_attrs = True
    sniff_bytes = 4

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        return head[:4] == b"PK\x03\x04"  # a zip's first local header (torch.save writes no preamble)

    def digest(self, path: str) -> str:
        """sha256 of data.pkl and the record table (see :func:`torchzip_reader.read_pt`)."""
        return ptr.read_pt(path).digest

    def index(self, path: str) -> FileIndex:
        """Every tensor at ``obj[group][name]`` (str keys), in pickle order; ``storage_data`` is the
        :class:`~streamconv.storage.torchzip_reader.TensorRef`.  Top-level scalars are the attrs."""
        pt = ptr.read_pt(path)
        tensors = tuple(IndexEntry(key[0], key[1], ref.dtype, ref.shape, ref.offset, ref.stride, ref)
                        for key, ref in ptr.tensors(pt.obj, path=path).items()
                        if len(key) == 2 and all(isinstance(k, str) for k in key))
        attrs = ()
        if isinstance(pt.obj, dict):
            attrs = tuple((k, v) for k, v in pt.obj.items() if isinstance(k, str) and type(v) in _SCALARS)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise FormatError(f"{path}: cannot read ({exc.strerror or exc}).") from None
        return FileIndex(path, size, pt.digest, tensors, attrs)

    def compute_layout(self, entries, attrs=(), groups=(), *, text=None) -> torchzip.TorchZipLayout:
        if text is not None:
            raise ValidationError("text content given (expected none). Only a text format holds text.")
        return torchzip.compute_layout([torchzip.PtEntry(*e) for e in entries], attrs, groups=groups)

    def create(self, path: str, layout: torchzip.TorchZipLayout) -> None:
        torchzip.create(path, layout)

    def write_piece(self, path: str, layout: torchzip.TorchZipLayout, index: int, data, offset: int = 0) -> Piece:
        return torchzip.write_piece(path, layout, index, data, offset)

    def finish(self, path: str, layout: torchzip.TorchZipLayout, pieces: Iterable[Piece]) -> list[int]:
        return torchzip.finish(path, layout, pieces)

    def abort(self, path: str) -> None:
        torchzip.abort(path)

    def check_file(self, path: str, record: dict, layout: torchzip.TorchZipLayout | None = None) -> FileCheck:
        """With a layout: size, then each tensor record's CRC.  Without: the zip's own CRCs
        (``zipfile.testzip``) and its data records' CRCs, in record order, against the journaled ones."""
        if layout is not None:
            problem = _pieces.size_problem(path, layout, record)
            if problem:
                return FileCheck(0, [problem])
            labels = [f"{e.group}.{e.name}" for e in layout.entries]
            problems = _pieces.crc_problems(path, layout, record, labels)
            if not problems:  # the data is right: now every other byte (pickle, zip headers and directory)
                problems = [p for p in [_pieces.file_crc_problem(path, record, layout.spans)] if p]
            return FileCheck(len(layout.spans), problems)
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                data = sorted((i for i in z.infolist() if "/data/" in i.filename),
                              key=lambda i: int(i.filename.rsplit("/", 1)[1]))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            return FileCheck(0, [f"{path}: not a readable zip file ({exc.__class__.__name__}: {exc}). Delete the "
                                 f"file and run the plan again."])
        if bad is not None:
            return FileCheck(len(data), [f"{path}: record {bad} fails its CRC (corrupted on disk?)."])
        if [i.CRC for i in data] != record.get("crc32"):
            return FileCheck(len(data), [f"{path}: record checksums differ from the journal."])
        try:
            records = ptr.read_pt(path).records
            spans = [records[k] for k in sorted(records, key=lambda k: int(k) if k.isdigit() else -1)]
        except FormatError as exc:
            return FileCheck(len(data), [f"{exc} Delete the file and run the plan again."])
        problem = _pieces.file_crc_problem(path, record, spans)
        return FileCheck(len(data), [problem] if problem else [])


MEGATRON_PT = MegatronPtFormat()
