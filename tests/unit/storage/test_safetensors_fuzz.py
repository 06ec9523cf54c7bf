"""The safetensors header parser on random and mutated input: only FormatError, never a crash, a hang or a
huge allocation."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv.errors import FormatError
from streamconv.storage import safetensors as S

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_file() -> bytes:
    entries = [("a", "bfloat16", (3, 5)), ("b", "float32", (7,)), ("c", "float8_e4m3fn", (4, 4))]
    head, offsets = S.layout(entries, {"format": "pt"})
    size = len(head) + sum(e - s for s, e in offsets.values())
    return head + bytes(size - len(head))


def _parse(tmp_path, data: bytes):
    p = tmp_path / "f.safetensors"
    p.write_bytes(data)
    try:
        S.read_header(str(p))
    except FormatError as exc:
        assert str(p) in str(exc)  # every error names the file


@SETTINGS
@given(data=st.binary(max_size=512))
def test_random_bytes(tmp_path, data):
    _parse(tmp_path, data)


@SETTINGS
@given(pos=st.integers(0, 400), value=st.integers(0, 255), cut=st.integers(0, 600))
def test_mutated_valid_file(tmp_path, pos, value, cut):
    data = bytearray(_valid_file())
    if pos < len(data):
        data[pos] = value
    _parse(tmp_path, bytes(data[: max(cut, 0)] if cut < len(data) else data))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=5), tail=st.integers(0, 256))
def test_random_json_headers(tmp_path, header, tail):
    raw = json.dumps(header).encode()
    _parse(tmp_path, struct.pack("<Q", len(raw)) + raw + bytes(tail))


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 4]}, "span 4 bytes but BF16"),
    ({"dtype": "BF16", "shape": [2, -2], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}, "unsupported dtype"),
    ({"dtype": "BF16", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 2 ** 81]}, "outside the file|span"),
    ({"dtype": "BF16", "shape": [2], "data_offsets": [4]}, "not \\[begin, end\\]"),
])
def test_bad_entries_named(tmp_path, entry, match):
    raw = json.dumps({"t": entry}).encode()
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    with pytest.raises(FormatError, match=match):
        S.read_header(str(p))


def test_overlapping_offsets(tmp_path):
    raw = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(FormatError, match="tensors x and y overlap"):
        S.read_header(str(p))


def test_huge_header_length_allocates_nothing(tmp_path):
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        S.read_header(str(p))
    p.write_bytes(struct.pack("<Q", 50 * 2 ** 20) + b"{}")  # plausible length, file too short: no 50 MB buffer
    with pytest.raises(FormatError, match="truncated"):
        S.read_header(str(p))
