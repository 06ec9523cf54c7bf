"""A safetensors file written from a dict of tensors, and a read node per tensor: the fixture that the graph,
mapping-rule and quantization unit tests evaluate their graphs over."""

import os

from streamconv import types
from streamconv.graph.node import Node, read
from streamconv.storage.safetensors import SafetensorsWriter, read_header


def write_with_reads(root: str, name: str, tensors: dict) -> dict[str, Node]:
    """Write ``tensors`` to ``root/name`` with the project's writer; return ``{tensor: read node}`` built from
    the header read back (so offsets come from the file, not from the writer's bookkeeping)."""
    path = os.path.join(root, name)
    entries = [(k, types.from_torch(v.dtype).name, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, entries) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return {k: read(name, k, i.dtype, i.shape, offset=i.start) for k, i in read_header(path).tensors.items()}
