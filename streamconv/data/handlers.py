"""Rows to token sequences: MindSpeed-LLM's ``GeneralPretrainHandler`` and ``AlpacaStyleInstructionHandler``.

A handler turns one :class:`~streamconv.data.inputs.Batch` into, for each of its output datasets, the
concatenated int32 tokens and the per-document lengths (one sequence per document), plus counters.  It is
pure given the tokenizer, so batches can be encoded in any order and on any number of threads.

Pretrain (spec §9.3, §9.6): for each ``--json-keys`` column the text is encoded as the HF tokenizer call does
(BOS included per the tokenizer config), ``--append-eod`` appends the eos id; an empty string gives no
document; a null or non-string value is an error naming the row (``--skip-bad-rows`` drops the row instead).

Instruction (spec §9.4, §9.6): prompt = instruction + "\\n" + input (empty parts left out), optional history
pairs and system text when ``--map-keys`` names their columns; encoded with the prompt template; labels are
-100 over every source; attention mask all ones.  Rows whose output is null are dropped (counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from ..errors import SourceError, ValidationError
from .inputs import MISSING, Batch, TooLarge
from .templates import Template, fill
from .tokenizer import Tokenizer

IGNORE = -100
DEFAULT_CUTOFF = 100_000          # when no --seq-length: the reference's cutoff
MAP_KEYS = ("prompt", "query", "response", "system", "history")
ALPACA_DEFAULT_KEYS = {"prompt": "instruction", "query": "input", "response": "output"}
PRETRAIN = "GeneralPretrainHandler"
INSTRUCTION = "AlpacaStyleInstructionHandler"
HANDLERS = (PRETRAIN, INSTRUCTION)


@dataclass
class Encoded:
    """A batch's output: dataset name -> (tokens int32[N], lengths int32[docs]); counters."""

    data: dict[str, tuple[np.ndarray, np.ndarray]]
    stats: dict[str, int] = field(default_factory=dict)


def _pack(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    tokens = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum(dtype=np.int64)))
    return tokens, lengths


DEFAULT_MAX_ROW_BYTES = 32 << 20   # far above any real document (a whole book is a few MB)


class _BadRows:
    """Bad rows are an error naming the row, or counted and dropped with --skip-bad-rows.  A row whose text
    exceeds ``max_row_bytes`` (UTF-8) is bad too: tokenizing it would take many times its size in memory."""

    def __init__(self, skip: bool, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES):
        self.skip = skip
        self.max_row_bytes = max_row_bytes

    def oversized(self, batch: Batch, i: int, values) -> bool:
        """Whether row i's text values exceed the cap (raises unless --skip-bad-rows)."""
        total = 0
        for v in values:
            if isinstance(v, str):
                total += len(v) if len(v) * 4 <= self.max_row_bytes else len(v.encode("utf-8", "surrogatepass"))
        if total <= self.max_row_bytes:
            return False
        if not self.skip:
            raise SourceError(f"{batch.where(i)}: the row holds {total} bytes of text, over --max-row-bytes "
                              f"{self.max_row_bytes}. Split the document, raise --max-row-bytes, or pass "
                              f"--skip-bad-rows to drop such rows.")
        return True

    def check(self, batch: Batch, i: int, column: str, value, *, kind: str = "a string") -> None:
        if isinstance(value, TooLarge):
            what = f"the row is {value.size} bytes, over --max-row-bytes {value.limit}"
            kind = "a smaller row; split the document or raise --max-row-bytes"
        elif value is MISSING:
            what = f"no key {column!r} in the row"
        elif value is None:
            what = f"column {column!r} is null"
        else:
            what = f"column {column!r} holds a {type(value).__name__}"
        if not self.skip:
            raise SourceError(f"{batch.where(i)}: {what} (expected {kind}). Fix the row, or pass --skip-bad-rows "
                              f"to drop such rows.")


class PretrainHandler:
    def __init__(self, tokenizer: Tokenizer, json_keys: list[str], *, append_eod: bool, skip_bad_rows: bool,
                 max_row_bytes: int = DEFAULT_MAX_ROW_BYTES):
        if not json_keys:
            raise ValidationError("--json-keys: no key given (expected at least one, e.g. text).")
        if append_eod and tokenizer.info.eos_id is None:
            raise ValidationError(f"{tokenizer.info.path}: --append-eod needs an eos_token in tokenizer_config.json "
                                  f"(none set). Set it, or drop --append-eod.")
        self.tokenizer = tokenizer
        self.keys = list(json_keys)
        self.append_eod = append_eod
        self.bad = _BadRows(skip_bad_rows, max_row_bytes)

    @property
    def columns(self) -> list[str]:
        return self.keys

    def output_names(self, prefix: str) -> dict[str, str]:
        return {key: f"{prefix}_{key}_document" for key in self.keys}

    def encode(self, batch: Batch) -> Encoded:
        n = len(batch)
        good = [True] * n
        for key in self.keys:
            for i, v in enumerate(batch.columns[key]):
                if not isinstance(v, str) and good[i]:
                    self.bad.check(batch, i, key, v)
                    good[i] = False
        for i in range(n):
            if good[i] and self.bad.oversized(batch, i, [batch.columns[key][i] for key in self.keys]):
                good[i] = False
        out, tokens, docs = {}, 0, 0
        eod = [self.tokenizer.info.eos_id] if self.append_eod else []
        for key in self.keys:
            texts = [v for v, ok in zip(batch.columns[key], good) if ok and v]  # "" -> no document
            ids, lengths = self.tokenizer.encode_call_packed(texts, eod)
            lengths = lengths[lengths > 0]  # a text giving no tokens gives no document
            out[key] = ids, lengths
            tokens += int(ids.size)
            docs += int(lengths.size)
        return Encoded(out, {"rows": n, "documents": docs, "tokens": tokens, "skipped_bad_rows": n - sum(good)})


def parse_map_keys(text: str | None) -> dict[str, str]:
    """``--map-keys '{"prompt":"instruction","query":"input","response":"output"}'`` -> role -> column, over
    the Alpaca defaults; history and system columns are read only when named here."""
    keys = dict(ALPACA_DEFAULT_KEYS)
    if text is None:
        return keys
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"--map-keys: not valid JSON ({exc}). Pass e.g. "
                              f"'{{\"prompt\":\"instruction\",\"query\":\"input\",\"response\":\"output\"}}'.") from None
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise ValidationError("--map-keys: expected a JSON object of role -> column name strings.")
    unknown = sorted(set(given) - set(MAP_KEYS))
    if unknown:
        raise ValidationError(f"--map-keys: unknown role {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(MAP_KEYS)}).")
    keys.update(given)
    return keys


def _infer_max_len(source_len: int, target_len: int, max_len: int, reserved_label_len: int) -> tuple[int, int]:
    # LLaMA-Factory's infer_max_len, which the reference template code truncates with.
    max_target_len = int(max_len * (target_len / (source_len + target_len)))
    max_target_len = max(max_target_len, reserved_label_len)
    max_source_len = max_len - min(max_target_len, target_len)
    return max_source_len, max_target_len


def make_pairs(messages: list[list[int]], cutoff: int, reserved_label_len: int = 1) -> list[tuple[list, list]]:
    """(source, target) per turn, truncated to ``cutoff`` tokens in all (the reference's ``_make_pairs``)."""
    pairs, total = [], 0
    for i in range(0, len(messages), 2):
        if total >= cutoff:
            break
        max_source, max_target = _infer_max_len(len(messages[i]), len(messages[i + 1]), cutoff - total,
                                                reserved_label_len)
        source, target = messages[i][:max_source], messages[i + 1][:max_target]
        total += len(source) + len(target)
        pairs.append((source, target))
    return pairs


class InstructionHandler:
    NAMES = ("input_ids", "attention_mask", "labels")

    def __init__(self, tokenizer: Tokenizer, template: Template, map_keys: dict[str, str], *,
                 seq_length: int | None, skip_bad_rows: bool, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES):
        info = tokenizer.info
        if info.eos_id is None or (template.prefix_bos and info.bos_id is None):
            raise ValidationError(f"{info.path}: the {template.name} template needs bos_token and eos_token in "
                                  f"tokenizer_config.json (bos {info.bos_id}, eos {info.eos_id}). Set them.")
        self.tokenizer = tokenizer
        self.template = template
        self.keys = dict(map_keys)
        self.cutoff = seq_length or DEFAULT_CUTOFF
        self.bad = _BadRows(skip_bad_rows, max_row_bytes)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(self.keys[r] for r in MAP_KEYS if r in self.keys))

    def output_names(self, prefix: str) -> dict[str, str]:
        return {name: f"{prefix}_packed_{name}_document" for name in self.NAMES}

    def _conversation(self, batch: Batch, i: int):
        """(turns [(user, assistant)], system) of row i; None when the row is dropped (null output) or bad."""
        get = {role: batch.columns[col][i] for role, col in self.keys.items()}
        flat = [x for v in get.values() for x in (v if isinstance(v, list) else [v])]
        if self.bad.oversized(batch, i, [y for x in flat for y in (x if isinstance(x, (list, tuple)) else [x])]):
            return None
        response = get["response"]
        if response is None:
            return "dropped"
        if not isinstance(response, str):
            self.bad.check(batch, i, self.keys["response"], response)
            return None
        parts = []
        for role in ("prompt", "query"):
            v = get.get(role)
            if v is None or v is MISSING:
                continue
            if not isinstance(v, str):
                self.bad.check(batch, i, self.keys[role], v)
                return None
            if v:
                parts.append(v)
        turns = []
        history = get.get("history")
        if history is not None and history is not MISSING:
            if not (isinstance(history, list) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                                      and all(isinstance(x, str) for x in p) for p in history)):
                self.bad.check(batch, i, self.keys["history"], history, kind="a list of [prompt, response] pairs")
                return None
            turns = [(q, a) for q, a in history]
        turns.append(("\n".join(parts), response))
        system = get.get("system")
        if system is None or system is MISSING:
            system = ""
        elif not isinstance(system, str):
            self.bad.check(batch, i, self.keys["system"], system)
            return None
        return turns, system or self.template.default_system

    def encode(self, batch: Batch) -> Encoded:
        t = self.template
        texts: list[str] = []

        def slot(s: str) -> int:
            """Index of the ids of ``s`` once the batch is encoded; -1 for an empty string (no ids)."""
            if not s:
                return -1
            texts.append(s)
            return len(texts) - 1

        rows, dropped, bad = [], 0, 0
        for i in range(len(batch)):
            conv = self._conversation(batch, i)
            if conv == "dropped":
                dropped += 1
                continue
            if conv is None:
                bad += 1
                continue
            turns, system = conv
            rows.append(([(slot(fill(t.user, q)), slot(fill(t.assistant, a))) for q, a in turns],
                         slot(fill(t.system, system)) if system else -1))
        ids = self.tokenizer.encode_plain(texts)
        info = self.tokenizer.info
        sep = self.tokenizer.encode_plain([t.separator])[0] if t.separator else []
        bos = [info.bos_id] if t.prefix_bos else []
        eos = [info.eos_id] if t.assistant_eos else []
        input_ids, labels = [], []
        for turns, sys_slot in rows:
            messages = []
            for k, (u, a) in enumerate(turns):
                head = (bos + (ids[sys_slot] if sys_slot >= 0 else [])) if k == 0 else sep
                messages.append(head + (ids[u] if u >= 0 else []))
                messages.append((ids[a] if a >= 0 else []) + eos)
            seq, lab = [], []
            for source, target in make_pairs(messages, self.cutoff):
                seq += source + target
                lab += [IGNORE] * len(source) + target
            input_ids.append(seq)
            labels.append(lab)
        tokens, lengths = _pack(input_ids)
        out = {"input_ids": (tokens, lengths), "attention_mask": (np.ones_like(tokens), lengths.copy()),
               "labels": (_pack(labels)[0], lengths.copy())}
        return Encoded(out, {"rows": len(batch), "documents": len(rows), "tokens": int(tokens.size),
                             "skipped_bad_rows": bad, "dropped_null_output": dropped})
