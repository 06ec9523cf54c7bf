"""A text summary of indexed datasets: counts, a length histogram and the first samples (detokenized when a
tokenizer is given)."""

from __future__ import annotations

import glob
import os

import numpy as np

from ..errors import SourceError
from .indexed import IndexedReader

_IGNORE = -100


def dataset_prefixes(path: str) -> list[str]:
    """Prefixes of the datasets ``path`` names: P.idx/P.bin, P itself, or every P_*_document of a run's
    --output-prefix P.  Empty when there are none."""
    for ext in (".idx", ".bin"):
        if path.endswith(ext) and os.path.isfile(path):
            return [path[: -len(ext)]]
    if os.path.isfile(path + ".idx"):
        return [path]
    return sorted(p[: -len(".idx")] for p in glob.glob(glob.escape(path) + "_*document.idx"))


def _histogram(lengths: np.ndarray) -> list[str]:
    if not lengths.size:
        return []
    top = int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1)))
    edges = [0] + [2 ** k for k in range(top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    peak = max(int(counts.max()), 1)
    rows = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        if n:
            rows.append(f"    [{lo:>7}, {hi:>7})  {int(n):>10}  {'#' * max(1, round(30 * int(n) / peak))}")
    return rows


def _sample_line(values: np.ndarray, tokenizer, name: str) -> str:
    shown = ", ".join(str(int(v)) for v in values[:24]) + (", ..." if len(values) > 24 else "")
    line = f"    ids [{shown}] ({len(values)} tokens)"
    if tokenizer is not None and not name.endswith("attention_mask_document"):
        kept = values[values != _IGNORE]
        text = tokenizer.decode(kept)
        text = text if len(text) <= 240 else text[:240] + "..."
        ignored = len(values) - len(kept)
        line += f"\n    text{f' (after {ignored} ignored labels)' if ignored else ''}: {text!r}"
    return line


def inspect_datasets(path: str, *, tokenizer_path: str | None = None, samples: int = 3) -> str:
    prefixes = dataset_prefixes(path)
    if not prefixes:
        raise SourceError(f"{path}: no indexed dataset (expected P.idx + P.bin, or P_*_document.idx). "
                          f"Pass a dataset prefix or a .idx file.")
    tokenizer = None
    if tokenizer_path:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
    out = []
    for prefix in prefixes:
        r = IndexedReader(prefix)
        idx = r.index
        lengths = idx.lengths.astype(np.int64)
        docs = len(idx.document_indices) - 1
        one_each = bool(np.array_equal(idx.document_indices, np.arange(len(lengths) + 1)))
        out.append(f"{prefix}  ({idx.dtype}, {os.path.getsize(prefix + '.bin')} bytes .bin)")
        out.append(f"  sequences {len(lengths)}, documents {docs}"
                   f"{' (one sequence each)' if one_each else ''}, tokens {int(lengths.sum())}")
        if lengths.size:
            out.append(f"  length min {int(lengths.min())}, mean {lengths.mean():.1f}, "
                       f"median {int(np.median(lengths))}, max {int(lengths.max())}")
            out.append("  lengths (tokens)        sequences")
            out += _histogram(lengths)
        for i in range(min(samples, len(r))):
            out.append(f"  sample {i}:")
            out.append(_sample_line(r[i], tokenizer, prefix))
    return "\n".join(out)
