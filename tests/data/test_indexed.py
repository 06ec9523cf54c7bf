"""The MMIDIDX writer and reader against bytes built by hand, and against Megatron-Core's own reader."""

import struct

import numpy as np
import pytest

from streamconv.data import indexed
from streamconv.errors import FormatError

from .reference import indexed_bytes, read_pair


def _docs(seed=0, n=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(-100, 50000, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def _write(prefix, docs, chunks=(7, 1, 20)):
    w = indexed.IndexedWriter(prefix)
    i = 0
    for size in list(chunks) + [len(docs)]:
        part = docs[i: i + size]
        i += len(part)
        w.append(np.array([t for d in part for t in d], dtype=np.int32), np.array([len(d) for d in part]))
    w.finish()
    indexed.commit([prefix])


def test_header_is_34_bytes_with_the_spec_fields():
    h = indexed.header(np.int32, 5, 6)
    assert len(h) == indexed.HEADER_BYTES == 34
    assert h[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", h[9:]) == (1, 4, 5, 6)


def test_writer_bytes_equal_the_hand_built_dataset(tmp_path):
    docs = _docs()
    prefix = str(tmp_path / "d")
    _write(prefix, docs)
    assert read_pair(prefix) == indexed_bytes(docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no partial or side file left
    r = indexed.IndexedReader(prefix)
    assert len(r) == len(docs)
    assert [r[i].tolist() for i in range(len(docs))] == docs


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "e")
    _write(prefix, [], chunks=())
    assert read_pair(prefix) == indexed_bytes([])


def test_resume_truncates_to_the_journaled_state(tmp_path):
    docs = _docs(1)
    prefix = str(tmp_path / "r")
    w = indexed.IndexedWriter(prefix)
    w.append(np.array([t for d in docs[:10] for t in d], dtype=np.int32), np.array([len(d) for d in docs[:10]]))
    state = w.state
    w.append(np.array([7, 7, 7], dtype=np.int32), np.array([3]))  # written after the journal line: discarded
    w.close()
    w = indexed.IndexedWriter(prefix, resume_at=state)
    w.append(np.array([t for d in docs[10:] for t in d], dtype=np.int32), np.array([len(d) for d in docs[10:]]))
    w.finish()
    indexed.commit([prefix])
    assert read_pair(prefix) == indexed_bytes(docs)


def test_resume_refuses_files_shorter_than_the_journal(tmp_path):
    prefix = str(tmp_path / "s")
    w = indexed.IndexedWriter(prefix)
    w.append(np.arange(4, dtype=np.int32), np.array([4]))
    w.close()
    with pytest.raises(FormatError, match="journal recorded 32"):
        indexed.IndexedWriter(prefix, resume_at=(32, 2))


def test_commit_replaces_an_older_dataset(tmp_path):
    prefix = str(tmp_path / "o")
    _write(prefix, _docs(2))
    _write(prefix, _docs(3, n=5))
    assert read_pair(prefix) == indexed_bytes(_docs(3, n=5))


def test_reader_rejects_a_foreign_file(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"not an index at all, longer than thirty-four bytes")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="not an MMIDIDX index"):
        indexed.IndexedReader(str(tmp_path / "x"))
