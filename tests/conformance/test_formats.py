"""Every registered tensor format against the shipped conformance suites (streamconv.testing).

One writer-suite class and one reader-suite class per format in the registry, generated here: a new format is
tested by registering it.  Files are read back through the format's own index; test_writers.py adds the
independent readers (torch.load, the safetensors library) for the built-in formats.
"""

from __future__ import annotations

from streamconv.storage.registry import format_names, get_format
from streamconv.testing.reader_suite import ReaderTests
from streamconv.testing.writer_suite import ProtocolTests

TENSOR_FORMATS = [name for name in format_names() if not get_format(name).is_text]


def test_the_built_in_formats_are_registered():
    assert {"megatron_pt", "safetensors"} <= set(TENSOR_FORMATS)


for _name in TENSOR_FORMATS:
    _fmt = get_format(_name)
    globals()[f"TestWriter_{_name}"] = type(f"TestWriter_{_name}", (ProtocolTests,), {"fmt": _fmt})
    globals()[f"TestReader_{_name}"] = type(f"TestReader_{_name}", (ReaderTests,), {"fmt": _fmt})
