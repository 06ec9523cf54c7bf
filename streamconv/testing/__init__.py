"""Conformance suites for storage formats, shipped with the package like ``zarr.testing.store.StoreTests``.

* :mod:`streamconv.testing.writer_suite`: ``WriterTests`` (any streaming writer, five hooks) and
  ``ProtocolTests`` (a :class:`~streamconv.storage.base.TensorFormat`'s write protocol: set ``fmt``).
* :mod:`streamconv.testing.reader_suite`: ``ReaderTests`` (a format's index, digest, sniffing, checks and
  read errors: set ``fmt``).

A format's tests subclass them and supply the format object; ``tests/conformance/test_formats.py`` does so
for every registered format.  These modules import pytest, so only tests import them; nothing in the
package does.
"""
