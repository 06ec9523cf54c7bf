"""Output formats as the executor sees them: a layout fixed up front, then stateless piece writes.

Every format offers the same four steps, callable from any thread or process (plain functions over plain
data, so a dask.distributed worker can run them):

1. ``layout(file)``   fix every byte offset from the planned tensors alone (deterministic)
2. ``create``         make the file under its temporary name, at its final size
3. ``write_piece``    write bytes of tensor ``index`` at ``offset`` within it; returns a piece record
4. ``finish``         check that the pieces tile every tensor, write headers, fsync, rename into place
"""

from __future__ import annotations

from ..plan.plan import OutputFile
from ..storage import torchzip


def pt_layout(f: OutputFile) -> torchzip.TorchZipLayout:
    entries = [torchzip.PtEntry(t.group, t.name, t.node.dtype, tuple(t.node.shape)) for t in f.tensors]
    return torchzip.compute_layout(entries, list(f.attrs), groups=f.groups)


LAYOUTS = {"megatron_pt": pt_layout}
CREATE = {"megatron_pt": torchzip.create}
WRITE_PIECE = {"megatron_pt": torchzip.write_piece}
FINISH = {"megatron_pt": torchzip.finish}
ABORT = {"megatron_pt": torchzip.abort}
