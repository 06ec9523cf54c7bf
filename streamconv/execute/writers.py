"""Output formats as the executor sees them: a layout fixed up front, then stateless piece writes.

Every format offers the same four steps, callable from any thread or process (plain functions over plain
data, so a dask.distributed worker can run them):

1. ``layout(file)``   fix every byte offset from the planned tensors alone (deterministic)
2. ``create``         make the file under its temporary name, at its final size
3. ``write_piece``    write bytes of tensor ``index`` at ``offset`` within it; returns a piece record
4. ``finish``         check that the pieces tile every tensor, write headers, fsync, rename into place
"""

from __future__ import annotations

from ..errors import ValidationError
from ..plan.plan import OutputFile
from ..storage import safetensors, torchzip


def pt_layout(f: OutputFile) -> torchzip.TorchZipLayout:
    entries = [torchzip.PtEntry(t.group, t.name, t.node.dtype, tuple(t.node.shape)) for t in f.tensors]
    return torchzip.compute_layout(entries, list(f.attrs), groups=f.groups)


def safetensors_layout(f: OutputFile) -> safetensors.SafetensorsLayout:
    """A flat HF shard: tensors by HF name in plan order; ``f.attrs`` (str pairs) become ``__metadata__``."""
    problems = [f"{f.path}: {t.name}: group {t.group!r} (expected ''). safetensors files are flat; put the "
                f"full HF name in the tensor name." for t in f.tensors if t.group]
    if f.groups:
        problems.append(f"{f.path}: groups {list(f.groups)} (expected none). safetensors files are flat.")
    if problems:
        raise ValidationError(problems)
    entries = [(t.name, t.node.dtype, tuple(t.node.shape)) for t in f.tensors]
    try:
        return safetensors.compute_layout(entries, dict(f.attrs))
    except ValidationError as exc:  # name the file: the layout alone does not know it
        raise ValidationError([f"{f.path}: {p}" for p in exc.problems]) from None


LAYOUTS = {"megatron_pt": pt_layout, "safetensors": safetensors_layout}
CREATE = {"megatron_pt": torchzip.create, "safetensors": safetensors.create}
WRITE_PIECE = {"megatron_pt": torchzip.write_piece, "safetensors": safetensors.write_piece}
FINISH = {"megatron_pt": torchzip.finish, "safetensors": safetensors.finish}
ABORT = {"megatron_pt": torchzip.abort, "safetensors": safetensors.abort}
