"""An eager reference of the dataset conversion, written from the spec (§9.3-9.6) and deliberately simple:
whole files in memory, the tokenizers library called row by row, the .idx built with struct and numpy.
It shares no code with streamconv.data."""

from __future__ import annotations

import json
import struct

import numpy as np

from .corpus import ASSISTANT, USER


def read_rows(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pretrain_docs(rows: list[dict], tok, *, key: str = "text", append_eod: bool = True,
                  eod: int = 1) -> list[list[int]]:
    """§9.3/9.6: the HF call (BOS through the post-processor), EOD appended, empty rows give no document."""
    docs = []
    for row in rows:
        text = row[key]
        if text == "":
            continue
        ids = tok.encode(text).ids
        if append_eod:
            ids = ids + [eod]
        docs.append(ids)
    return docs


def instruction_samples(rows: list[dict], tok, *, bos: int = 0, eos: int = 1, cutoff: int = 100000,
                        history_key: str | None = None, system_key: str | None = None):
    """§9.4/9.6, template deepseek3: (input_ids, labels) per kept row."""
    def ids(s):
        return tok.encode(s, add_special_tokens=False).ids if s else []

    out = []
    for row in rows:
        if row["output"] is None:
            continue
        prompt = "\n".join(p for p in (row["instruction"], row["input"]) if p)
        turns = [tuple(p) for p in (row.get(history_key) or [])] if history_key else []
        turns.append((prompt, row["output"]))
        system = (row.get(system_key) or "") if system_key else ""
        messages = []
        for t, (q, a) in enumerate(turns):
            source = ([bos] + ids(system) if t == 0 else []) + ids(USER + q + ASSISTANT)
            messages += [source, ids(a) + [eos]]
        input_ids, labels, total = [], [], 0
        for i in range(0, len(messages), 2):  # truncation, LLaMA-Factory's infer_max_len
            if total >= cutoff:
                break
            s, tg = messages[i], messages[i + 1]
            room = cutoff - total
            max_t = max(int(room * (len(tg) / (len(s) + len(tg)))), 1)
            max_s = room - min(max_t, len(tg))
            s, tg = s[:max_s], tg[:max_t]
            total += len(s) + len(tg)
            input_ids += s + tg
            labels += [-100] * len(s) + tg
        out.append((input_ids, labels))
    return out


def indexed_bytes(docs: list[list[int]]) -> tuple[bytes, bytes]:
    """(.bin, .idx) of an int32 MMIDIDX v1 dataset, one sequence per document."""
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.zeros(len(docs), dtype=np.int64)
    if len(docs) > 1:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * 4)
    doc_idx = np.arange(len(docs) + 1, dtype=np.int64)
    bin_ = b"".join(np.array(d, dtype=np.int32).tobytes() for d in docs)
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<Q", len(docs))
           + struct.pack("<Q", len(docs) + 1) + lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    return bin_, idx


def read_pair(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as f:
        b = f.read()
    with open(prefix + ".idx", "rb") as f:
        i = f.read()
    return b, i
