"""Small generated corpora and a small DeepSeek-V3-style tokenizer, built in the tests (no model hub)."""

from __future__ import annotations

import json
import os
import random

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT]

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_EXTRA = ["数据", "转换", "é", "ß", "🙂", "\n", "\t", "  ", "1234", "--", "Ünïcödé"]


def words(rng: random.Random, n: int = 400) -> list[str]:
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 8))) for _ in range(n)] + _EXTRA


def sentence(rng: random.Random, vocab: list[str], lo: int = 1, hi: int = 40) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def build_tokenizer(path: str, *, vocab_size: int = 600, config: dict | None = None, seed: int = 0,
                    post_processor: bool = True) -> str:
    """A byte-level BPE trained on generated text, with DeepSeek-V3's special tokens at ids 0..3 (BOS 0,
    EOS 1) and a post-processor that prepends BOS (what the HF call gives), saved as tokenizer.json and
    tokenizer_config.json (add_bos_token true, add_eos_token false)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(seed)
    vocab = words(rng)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sentence(rng, vocab) for _ in range(400)], trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, 0)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast",
           "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                         "rstrip": False, "single_word": False},
           "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                         "rstrip": False, "single_word": False},
           "model_max_length": 131072, "pad_token": None}
    cfg.update(config or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)
    return path


def pretrain_texts(n: int, seed: int = 1) -> list[str]:
    """Rows with every case the spec names: empty, whitespace-only, literal special tokens, unicode, long."""
    rng = random.Random(seed)
    vocab = words(rng)
    specials = ["", " ", "   \n\t ", f"hello {EOS} world", f"{BOS}{USER}x{ASSISTANT}", "a" * 300]
    out = []
    for i in range(n):
        if i % 7 == 3:
            out.append(specials[(i // 7) % len(specials)])
        else:
            out.append(sentence(rng, vocab, 1, 80 if i % 11 else 400))
    return out


def alpaca_rows(n: int, seed: int = 2, *, history: bool = False) -> list[dict]:
    """Alpaca-style rows: null output (dropped), null/empty instruction or input, empty output, specials."""
    rng = random.Random(seed)
    vocab = words(rng)
    rows = []
    for i in range(n):
        row = {"instruction": sentence(rng, vocab, 1, 20), "input": sentence(rng, vocab, 0, 10) if i % 3 else "",
               "output": sentence(rng, vocab, 1, 30)}
        k = i % 13
        if k == 1:
            row["output"] = None
        elif k == 2:
            row["instruction"] = None
        elif k == 4:
            row["input"] = None
        elif k == 5:
            row["instruction"], row["input"] = "", ""
        elif k == 6:
            row["output"] = ""
        elif k == 8:
            row["instruction"] = f"say {EOS} and {USER} literally"
        elif k == 9:
            row["output"] = "   "
        if history:
            row["system"] = sentence(rng, vocab, 1, 6) if i % 4 else (None if i % 8 else "")
            row["history"] = ([[sentence(rng, vocab, 1, 8), sentence(rng, vocab, 1, 8)] for _ in range(i % 3)]
                              if i % 5 else None)
        rows.append(row)
    return rows


def write_parquet(path: str, rows: list[dict], *, row_group_size: int = 17) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: str, rows: list[dict], *, blank_lines: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n")
            if blank_lines and i % 5 == 0:
                f.write("\n")
    return path


def write_json_array(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    return path
