"""A Megatron legacy (torch-format) checkpoint as named source tensors: rank file, group, name -> read node.

Each rank file is indexed by the ``megatron_pt`` format (:mod:`streamconv.storage.megatron_pt`: zip directory
and pickle only, parsed without running code from the file); tensor bytes are read later, band by band, by the
executor.  Layout-agnostic: which rank
files and keys exist is decided by the caller (the planner derives it from the model tables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import FormatError, ValidationError
from ..graph.node import Node, read
from ..layout.parallel import ParallelSizes, RankFile, iter_dir, rank_dir
from ..storage import fileio
from ..storage import torchzip_reader as ptr
from ..storage.megatron_pt import MEGATRON_PT, is_model_group
from .plan import SourceFile

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Expect:
    """What one key of a rank file must be: its shape, and the dtypes it may have (float weights by default;
    the uint8 entries of an NF4-quantized weight say so)."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...] = FLOAT_DTYPES


def iteration_dir(root: str, iteration: str | None = None) -> str:
    """The iteration directory name (``iter_0000100`` or ``release``), from ``iteration`` or the tracker file."""
    if iteration is None:
        path = os.path.join(root, TRACKER)
        try:
            iteration = fileio.read_small(path, 64, what="tracker").decode("ascii", "replace").strip()
        except FileNotFoundError:
            raise ValidationError(f"{path}: missing; is {root} a Megatron checkpoint directory? Pass the --save-dir "
                                  f"of training (or --iteration N).") from None
        except FormatError as exc:
            raise ValidationError(str(exc)) from None
    if iteration == "release":
        return "release"
    try:
        return iter_dir(int(iteration))
    except ValueError:
        raise ValidationError(f"{os.path.join(root, TRACKER)}: holds {iteration!r}; expected an iteration number "
                              f"or 'release'.") from None


def read_args(root: str, iteration: str | None = None) -> dict:
    """The ``args`` namespace of the checkpoint's first rank file as a dict ({} when it has none): what
    MindSpeed's generic converter (or ``--save-args``) records of the layout.  Parsed with the restricted reader."""
    it_path = os.path.join(root, iteration_dir(root, iteration))
    try:
        ranks = sorted(d for d in os.listdir(it_path) if d.startswith("mp_rank_"))
    except OSError:
        return {}
    for d in ranks[:1]:
        path = os.path.join(it_path, d, RANK_FILE)
        if os.path.isfile(path):
            obj = ptr.read_pt(path).obj
            args = obj.get("args") if isinstance(obj, dict) else None
            return dict(args) if isinstance(args, dict) else {}
    return {}


class McoreSource:
    """The rank files of one iteration of an mcore checkpoint, parsed without reading tensor data."""

    def __init__(self, root: str, sizes: ParallelSizes, ranks: list[RankFile], iteration: str | None = None,
                 prefix: str = ""):
        """``prefix``: where ``root`` lies under the plan's source root ('' when it is the source root), so
        plan file names stay relative to that root."""
        self.root = os.path.abspath(root)
        self.prefix = prefix
        self.sizes = sizes
        self.iteration = iteration_dir(self.root, iteration)
        self.files: list[SourceFile] = []
        self.tensors: dict[RankFile, dict[tuple[str, str], ptr.TensorRef]] = {}
        self.paths: dict[RankFile, str] = {}
        self._load(ranks)

    def rel(self, r: RankFile) -> str:
        """The rank file's name in the plan (relative to the plan's source root)."""
        return self.prefix + self.local(r)

    def local(self, r: RankFile) -> str:
        return f"{self.iteration}/{rank_dir(r, self.sizes)}/{RANK_FILE}"

    def path(self, r: RankFile) -> str:
        return self.paths.get(r) or os.path.join(self.root, *self.local(r).split("/"))

    def _load(self, ranks: list[RankFile]) -> None:
        it_path = os.path.join(self.root, self.iteration)
        if not os.path.isdir(it_path):
            raise ValidationError(f"{it_path}: missing; the tracker names iteration {self.iteration!r}, which is "
                                  f"not in {self.root}.")
        problems = []
        expected = {rank_dir(r, self.sizes) for r in ranks}
        present = sorted(d for d in os.listdir(it_path) if d.startswith("mp_rank_"))
        strays = [d for d in present if d not in expected]
        if strays:
            problems.append(f"{it_path}: holds rank dirs the flags do not account for ({', '.join(strays[:4])}"
                            f"{' ...' if len(strays) > 4 else ''}). Pass the --source-tensor/pipeline/expert-"
                            f"parallel-size (and layout flags) the checkpoint was trained with.")
        for r in ranks:
            path = self.path(r)
            if not os.path.isfile(path):
                problems.append(f"{path}: not a regular file (a directory, FIFO or device); expected a rank file."
                                if os.path.lexists(path) else
                                f"{path}: missing. The flags imply this rank file; check the parallel sizes, or "
                                f"restore the file.")
                continue
            try:
                index = MEGATRON_PT.index(path)
            except FormatError as exc:
                problems.append(str(exc))
                continue
            self.paths[r] = path
            self.files.append(SourceFile(self.rel(r), index.size, index.digest))
            self.tensors[r] = {(e.group, e.name): e.storage_data for e in index.tensors if is_model_group(e.group)}
        if problems:
            raise ValidationError(problems)

    def check(self, expected: dict[RankFile, dict[tuple[str, str], tuple[int, ...] | Expect]], *,
              others: str | None = None, extras: bool = True) -> None:
        """Every expected ``(group, name)`` present with its shape (a bare shape, or an :class:`Expect`), row-major
        and one of its dtypes (float by default), and (``extras``) nothing else in the model groups (``others``:
        a sentence that replaces the default hint for unexpected keys).  Raises once, listing every problem."""
        problems = []
        for r, want in expected.items():
            have = self.tensors.get(r, {})
            path = self.paths.get(r, self.rel(r))
            for (group, name), spec in want.items():
                shape, dtypes = (spec.shape, spec.dtypes) if isinstance(spec, Expect) else (spec, FLOAT_DTYPES)
                ref = have.get((group, name))
                if ref is None:
                    problems.append(f"{path}: {group}.{name} missing. The layout flags (--moe-grouped-gemm, "
                                    f"--mtp-num-layers, VPP, noop, dualpipev, ...) must be those of training.")
                elif tuple(ref.shape) != tuple(shape):
                    problems.append(f"{path}: {group}.{name} has shape {list(ref.shape)} (expected {list(shape)}). "
                                    f"Check the parallel sizes and --hf-config.")
                elif ref.dtype not in dtypes:
                    problems.append(f"{path}: {group}.{name} has dtype {ref.dtype}; expected "
                                    f"{' or '.join(dtypes)}.")
                elif not ref.row_major:
                    problems.append(f"{path}: {group}.{name} is stored with strides {list(ref.stride)} (not row-"
                                    f"major). Re-save the checkpoint with contiguous tensors.")
            extra = sorted(k for k in have if extras and k not in want and not k[1].endswith("._extra_state"))
            for group, name in extra[:5]:
                problems.append(f"{path}: {group}.{name} is not part of the layout the flags describe. "
                                + (others or "Pass the training flags (layout, --mtp-num-layers, --lora-r/--lora-alpha "
                                             "for a LoRA checkpoint)."))
            if len(extra) > 5:
                problems.append(f"{path}: ... and {len(extra) - 5} more unexpected tensors.")
        if problems:
            raise ValidationError(problems)

    def get(self, rank: RankFile, group: str, name: str) -> Node:
        ref = self.tensors[rank][(group, name)]
        return read(self.rel(rank), f"{group}.{name}", ref.dtype, ref.shape, offset=ref.offset)

    def has(self, rank: RankFile, group: str, name: str) -> bool:
        return (group, name) in self.tensors.get(rank, {})

    def read_bytes(self, rank: RankFile, group: str, name: str) -> bytes:
        """A small tensor's bytes, read now (the planner reads NF4 quant-state JSON to check it)."""
        ref = self.tensors[rank][(group, name)]
        return fileio.read_range(self.path(rank), ref.offset, ref.nbytes).tobytes()

