"""The HF tokenizer, loaded offline through the ``tokenizers`` library (no transformers, no network).

``--tokenizer-name-or-path DIR`` must hold ``tokenizer.json`` (the fast tokenizer); ``tokenizer_config.json``,
when present, gives the special tokens and flags that transformers would apply on top of it:

- ``bos_token`` / ``eos_token`` (a string or an AddedToken dict): their ids; eod = the eos id.
- ``add_bos_token`` / ``add_eos_token``: what calling the tokenizer adds around the text.  Llama-style fast
  tokenizers (``LlamaTokenizerFast``, which DeepSeek-V3's config names) rebuild their post-processor from these
  flags (defaults true / false), whatever tokenizer.json says; so when the config states them, or names a
  Llama tokenizer class, we apply them ourselves to the plain encoding.  Otherwise the tokenizer.json
  post-processor decides (``encode(..., add_special_tokens=True)``), as transformers does for other classes.

Why not transformers' ``AutoTokenizer``: with transformers >= 5 a directory whose config names
``LlamaTokenizerFast`` but holds no model config.json is rebuilt with a sentencepiece-style pre-tokenizer,
which gives different ids (spec §9.6).  tokenizer.json read directly has no such trap.

Literal special-token strings in text (``<｜User｜>`` ...) are encoded as their ids: the ``tokenizers``
library splits added tokens before the model, exactly as the HF call does.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from itertools import chain

import numpy as np

from ..errors import SourceError, ValidationError

SUB_BATCH = 64
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TokenizerInfo:
    """What a handler needs to know about the tokenizer besides encoding."""

    path: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool | None   # None: the tokenizer.json post-processor decides what the call adds
    add_eos: bool | None
    vocab_size: int
    digest: str            # sha256 of tokenizer.json and tokenizer_config.json (resume checks)


class Tokenizer:
    """Thread-safe encoding of batches of strings (``tokenizers`` releases the GIL while encoding)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise ValidationError("dataset conversion needs the tokenizers library: pip install "
                                  "'streamconv[data]'.") from None
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            what = "no such directory" if not os.path.isdir(path) else "no tokenizer.json in it"
            raise SourceError(f"{path}: {what} (expected a HF tokenizer directory with tokenizer.json). "
                              f"Pass --tokenizer-name-or-path of a local model directory; a slow (sentencepiece) "
                              f"tokenizer must first be saved as a fast one with transformers' save_pretrained.")
        try:
            self._tok = _HFTokenizer.from_file(tj)
        except Exception as exc:  # tokenizers raises a plain Exception on a bad file
            raise SourceError(f"{tj}: cannot be loaded by the tokenizers library ({exc}). Re-copy the file.") from None
        config = {}
        cj = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cj):
            try:
                with open(cj, encoding="utf-8") as f:
                    config = json.load(f)
            except ValueError as exc:
                raise SourceError(f"{cj}: invalid JSON ({exc}). Re-copy the file.") from None
        digest = hashlib.sha256()
        for name in (tj, cj):
            if os.path.isfile(name):
                with open(name, "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
        llama = str(config.get("tokenizer_class", "")) in _LLAMA_CLASSES
        explicit = llama or "add_bos_token" in config or "add_eos_token" in config
        add_bos = bool(config.get("add_bos_token", llama)) if explicit else None
        add_eos = bool(config.get("add_eos_token", False)) if explicit else None
        bos_id = self._id_of(_token_text(config.get("bos_token")), "bos_token", cj)
        eos_id = self._id_of(_token_text(config.get("eos_token")), "eos_token", cj)
        if add_bos and bos_id is None:
            raise SourceError(f"{cj}: add_bos_token is true but no bos_token is set. Set bos_token in the config.")
        self.info = TokenizerInfo(os.path.abspath(path), bos_id, eos_id, add_bos, add_eos,
                                  self._tok.get_vocab_size(with_added_tokens=True), digest.hexdigest())
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _id_of(self, text: str | None, what: str, where: str) -> int | None:
        if text is None:
            return None
        tid = self._tok.token_to_id(text)
        if tid is None:
            raise SourceError(f"{where}: {what} {text!r} is not in the tokenizer's vocabulary. Fix the config.")
        return tid

    def _ids(self, texts: list[str], special: bool):
        """Yield the ids (a list) of each text, encoding ``SUB_BATCH`` texts at a time: an ``Encoding`` holds
        tokens, offsets and masks besides the ids (~10x the text), so only a few of them live at once."""
        for start in range(0, len(texts), SUB_BATCH):
            for e in self._encode(texts[start: start + SUB_BATCH], add_special_tokens=special):
                yield e.ids

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """``tokenizer.encode(text, add_special_tokens=False)`` for each text."""
        return list(self._ids(texts, False))

    def encode_call(self, texts: list[str]) -> list[list[int]]:
        """What calling the HF tokenizer on each text gives (``tokenizer(text)["input_ids"]``): BOS/EOS per the
        config flags, or the tokenizer.json post-processor when the config states none."""
        info = self.info
        if info.add_bos is None:
            return list(self._ids(texts, True))
        head = [info.bos_id] if info.add_bos else []
        tail = [info.eos_id] if info.add_eos else []
        return [head + ids + tail for ids in self._ids(texts, False)]

    def encode_call_packed(self, texts: list[str], append: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode_call` of every text with ``append`` added to each, as (int32 tokens concatenated,
        int32 lengths), without holding the batch as Python lists."""
        info = self.info
        special = info.add_bos is None
        head = [info.bos_id] if info.add_bos else []
        tail = ([info.eos_id] if info.add_eos else []) + list(append)
        parts, lengths = [], np.empty(len(texts), dtype=np.int32)
        chunk: list[list[int]] = []
        for i, ids in enumerate(self._ids(texts, special)):
            seq = head + ids + tail if (head or tail) else ids
            lengths[i] = len(seq)
            chunk.append(seq)
            if len(chunk) == SUB_BATCH:
                parts.append(_flatten(chunk))
                chunk = []
        if chunk:
            parts.append(_flatten(chunk))
        tokens = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
        return tokens, lengths

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _flatten(seqs: list[list[int]]) -> np.ndarray:
    return np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=sum(map(len, seqs)))


_CACHE: dict[tuple, Tokenizer] = {}
_LOCK = threading.Lock()


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of directory ``path``, loaded once per process (tasks share it)."""
    files = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer_config.json")]
    key = (os.path.abspath(path),) + tuple(os.stat(f).st_mtime_ns if os.path.exists(f) else None for f in files)
    with _LOCK:
        tok = _CACHE.get(key)
        if tok is None:
            tok = _CACHE[key] = Tokenizer(path)
    return tok
