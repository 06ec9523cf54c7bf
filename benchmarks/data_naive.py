"""The MindSpeed-style baseline of dataset conversion, run as a child process:

    python -m benchmarks.data_naive INPUT.parquet TOKENIZER_DIR OUTPUT_PREFIX WORKERS

The whole file is loaded into memory (pyarrow, as ``datasets.load_dataset`` does before ``map``), every row is
tokenized by the tokenizer call (one row at a time; with WORKERS > 1 in a ``multiprocessing.Pool``, as
preprocess_data.py does), every document is kept in memory, and the ``.bin``/``.idx`` pair is written at the
end.  It writes the same bytes as ``streamconv data preprocess ... --append-eod`` (the benchmark checks this).
"""

from __future__ import annotations

import os
import struct
import sys
from multiprocessing import Pool

import numpy as np

_TOK = None
EOD = 1


def _init(tokenizer_dir: str) -> None:
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))


def _encode(text: str) -> list[int]:
    if not text:
        return []
    return _TOK.encode(text).ids + [EOD]  # BOS from the tokenizer.json post-processor, then EOD


def main(path: str, tokenizer_dir: str, prefix: str, workers: int) -> int:
    import pyarrow.parquet as pq

    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    if workers == 1:
        _init(tokenizer_dir)
        docs = [_encode(t) for t in texts]
    else:
        with Pool(workers, initializer=_init, initargs=(tokenizer_dir,)) as pool:
            docs = list(pool.imap(_encode, texts, chunksize=25))
    docs = [d for d in docs if d]
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    tokens = np.concatenate([np.array(d, dtype=np.int32) for d in docs])
    pointers = np.zeros(len(docs), dtype=np.int64)
    pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * 4)
    with open(prefix + "_text_document.bin", "wb") as f:
        f.write(tokens.tobytes())
    with open(prefix + "_text_document.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, len(docs), len(docs) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    print(f"{len(texts)} rows, {len(docs)} documents, {tokens.size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
