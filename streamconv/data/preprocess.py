"""``streamconv data preprocess``: a corpus to Megatron indexed datasets, streaming, parallel and resumable.

The run is a raw Dask graph over input batches, built one segment of batches at a time:

    ("read", i)     the next batch from the input (a chain: read i depends on read i-1, so reads are in order)
    ("encode", i)   the handler's tokens for batch i (the parallel part; the tokenizers library releases the GIL)
    ("write", i)    append batch i's tokens to every output and journal it (a chain: writes are in order)

and ``("read", i)`` also depends on ``("write", i - in_flight)``, so at most ``in_flight`` (2 x workers)
batches are between read and write, whatever the scheduler.  Output order is input order, so the bytes do not
depend on the worker count.

Outputs are written under ``*.partial`` names (``.bin`` appended as batches complete, lengths in a side file)
and renamed when complete, ``.idx`` last.  After each batch the outputs are fsynced and a line is appended to
``<prefix>.streamconv_data_journal.jsonl`` (batch, input position, each output's byte and sequence counts).
Running the same command again resumes: partial files are cut back to the journaled lengths and reading
starts after the last journaled batch; the result is byte-identical to an uninterrupted run.  A journal of a
different command (other inputs, tokenizer or flags) is discarded and the run starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import dask

from ..errors import SourceError, ValidationError
from ..storage import fileio
from . import indexed, inputs
from .handlers import (HANDLERS, INSTRUCTION, PRETRAIN, Encoded, InstructionHandler, PretrainHandler,
                       parse_map_keys)
from .templates import get_template
from ..storage.lock import NAME as LOCK_NAME
from ..storage.lock import TargetLock
from .handlers import DEFAULT_MAX_ROW_BYTES
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".streamconv_data_journal.jsonl"
TOKENIZER_TYPES = ("PretrainedFromHF",)
SEGMENT_BATCHES = 256   # batches per Dask graph; the pipeline drains only at segment ends
JOURNAL_VERSION = 1
COUNTERS = ("rows", "documents", "tokens", "skipped_bad_rows", "dropped_null_output")


@dataclass(frozen=True)
class PreprocessOptions:
    input: str
    tokenizer_name_or_path: str
    output_prefix: str
    handler_name: str = PRETRAIN
    tokenizer_type: str = "PretrainedFromHF"
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    prompt_type: str | None = None
    map_keys: str | None = None
    seq_length: int | None = None
    skip_bad_rows: bool = False
    workers: int = 1
    scheduler: str = "threads"     # "threads" or "sync"
    batch_rows: int = 1000
    log_interval: int = 1000       # rows between log lines on stderr (0: none)
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES   # a row with more text is bad (error, or dropped with skip)


@dataclass
class PreprocessResult:
    outputs: dict[str, str]                       # dataset name -> path prefix of .bin/.idx
    counts: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    resumed_batches: int = 0                      # batches taken from the journal of an earlier run
    seconds: float = 0.0
    skipped_files: list[str] = field(default_factory=list)


def journal_path(output_prefix: str) -> str:
    return output_prefix + JOURNAL_SUFFIX


def make_handler(opts: PreprocessOptions):
    """Check the flags and load the tokenizer: every error here comes before anything is written."""
    if opts.tokenizer_type not in TOKENIZER_TYPES:
        raise ValidationError(f"--tokenizer-type {opts.tokenizer_type!r}: not supported (known: "
                              f"{', '.join(TOKENIZER_TYPES)}). Use PretrainedFromHF with a local tokenizer directory.")
    if opts.handler_name not in HANDLERS:
        raise ValidationError(f"--handler-name {opts.handler_name!r}: unknown handler (known: {', '.join(HANDLERS)}).")
    if opts.workers < 1 or opts.batch_rows < 1 or opts.scheduler not in ("threads", "sync"):
        raise ValidationError(f"--workers {opts.workers}, --batch-rows {opts.batch_rows}, --scheduler "
                              f"{opts.scheduler!r}: expected workers >= 1, batch rows >= 1, scheduler threads or sync.")
    if opts.max_row_bytes < 1:
        raise ValidationError(f"--max-row-bytes {opts.max_row_bytes}: expected a positive size.")
    if opts.seq_length is not None and opts.seq_length < 1:
        raise ValidationError(f"--seq-length {opts.seq_length}: expected a positive number of tokens.")
    template = get_template(opts.prompt_type) if (opts.handler_name == INSTRUCTION or opts.prompt_type) else None
    map_keys = parse_map_keys(opts.map_keys)
    tok = load_tokenizer(opts.tokenizer_name_or_path)
    if opts.handler_name == PRETRAIN:
        return PretrainHandler(tok, list(opts.json_keys), append_eod=opts.append_eod,
                               skip_bad_rows=opts.skip_bad_rows, max_row_bytes=opts.max_row_bytes)
    return InstructionHandler(tok, template, map_keys, seq_length=opts.seq_length, skip_bad_rows=opts.skip_bad_rows,
                              max_row_bytes=opts.max_row_bytes)


def run_digest(opts: PreprocessOptions, files: list[str], handler) -> str:
    """What the outputs depend on: input files (path, size, mtime), tokenizer files, flags; not the workers."""
    flags = {k: v for k, v in asdict(opts).items() if k not in ("workers", "scheduler", "log_interval",
                                                                 "max_row_bytes")}
    stamp = {"version": JOURNAL_VERSION, "flags": flags, "tokenizer": handler.tokenizer.info.digest,
             "inputs": [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=list).encode()).hexdigest()


# --- journal ------------------------------------------------------------------------------------------------

def _append(path: str, record: dict) -> None:
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        raise fileio.write_error(path, exc) from exc
    finally:
        os.close(fd)


def _read_journal(path: str, digest: str) -> list[dict] | None:
    """Records after the run line of ``digest``; None when there is no journal of this exact run."""
    try:
        with open(path, "rb") as f:
            raw = f.read().split(b"\n")
    except FileNotFoundError:
        return None
    records = []
    for line in raw:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash: that batch is simply done again
    if not records or records[0].get("kind") != "run" or records[0].get("digest") != digest:
        return None
    return records[1:]


def _resume_point(records: list[dict], prefixes: dict[str, str]) -> dict | None:
    """The last journaled batch whose outputs are all still on disk at least at the journaled size."""
    for rec in reversed([r for r in records if r.get("kind") == "batch"]):
        ok = True
        for name, prefix in prefixes.items():
            nbytes, count = rec["sizes"][name]
            p = indexed.paths(prefix)
            if not (os.path.isfile(p["bin_tmp"]) and os.path.getsize(p["bin_tmp"]) >= nbytes
                    and os.path.isfile(p["len_tmp"]) and os.path.getsize(p["len_tmp"]) >= 4 * count):
                ok = False
        if ok:
            return rec
    return None


# --- the pipeline ---------------------------------------------------------------------------------------------

class _Pipeline:
    """Shared state of the graph's tasks: the input iterator (read chain), the writers and the journal (write
    chain).  Each chain runs one task at a time, in order, by construction of the graph."""

    def __init__(self, handler, batches, writers: dict[str, indexed.IndexedWriter], jpath: str, counts: dict,
                 log_interval: int, stream):
        self.handler = handler
        self.batches = batches
        self.writers = writers
        self.jpath = jpath
        self.counts = counts
        self.exhausted = False
        self.aborted = False   # set on failure: tasks still running in pool threads then do nothing
        self.written = 0
        self.log_interval = log_interval
        self.stream = stream
        self.start = time.monotonic()
        self._start_rows = counts["rows"]
        self._lock = threading.Lock()

    def read(self, *_deps):
        with self._lock:
            if self.exhausted or self.aborted:
                return None
            batch = next(self.batches, None)
            if batch is None:
                self.exhausted = True
            return batch

    def encode(self, batch):
        return None if batch is None or self.aborted else (batch, self.handler.encode(batch))

    def write(self, item, *_deps) -> None:
        if item is None or self.aborted:
            return
        batch, enc = item
        enc: Encoded
        for name, (tokens, lengths) in enc.data.items():
            self.writers[name].append(tokens, lengths)
        for w in self.writers.values():
            w.sync()
        before = self.counts["rows"]
        for k, v in enc.stats.items():
            self.counts[k] = self.counts.get(k, 0) + v
        _append(self.jpath, {"kind": "batch", "batch": batch.index, "file": batch.file_index,
                             "row_end": batch.first_row + len(batch),
                             "sizes": {n: list(w.state) for n, w in self.writers.items()}, "counts": self.counts})
        self.written += 1
        if self.log_interval and before // self.log_interval != self.counts["rows"] // self.log_interval:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            rows = self.counts["rows"] - self._start_rows
            print(f"processed {self.counts['rows']} rows, {self.counts['documents']} documents, "
                  f"{self.counts['tokens']} tokens ({rows / elapsed:.0f} rows/s)", file=self.stream, flush=True)


def _segment_graph(pipe: _Pipeline, n: int, in_flight: int) -> dict:
    dsk: dict = {}
    for i in range(n):
        deps = ([("read", i - 1)] if i else []) + ([("write", i - in_flight)] if i >= in_flight else [])
        dsk[("read", i)] = (pipe.read, *deps)
        dsk[("encode", i)] = (pipe.encode, ("read", i))
        dsk[("write", i)] = (pipe.write, ("encode", i), *([("write", i - 1)] if i else []))
    return dsk


def check(opts: PreprocessOptions):
    """Every check that needs no output: flags, tokenizer, input files and their columns.  Returns (handler,
    files, skipped files, output prefixes); ``--dry-run`` stops here."""
    handler = make_handler(opts)
    files, skipped = inputs.list_inputs(opts.input)
    inputs.check_inputs(files, handler.columns)
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValidationError(f"--output-prefix {opts.output_prefix}: {out_dir} is not a directory.")
    return handler, files, skipped, handler.output_names(opts.output_prefix)


def preprocess(opts: PreprocessOptions, *, stream=None) -> PreprocessResult:
    """Convert ``opts.input`` into the handler's indexed datasets at ``opts.output_prefix``, holding the
    output's lock (``<prefix>.streamconv.lock``): a second run into the same prefix fails at once."""
    stream = stream or sys.stderr
    started = time.monotonic()
    handler, files, skipped, prefixes = check(opts)
    digest = run_digest(opts, files, handler)
    jpath = journal_path(opts.output_prefix)
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    made = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ValidationError(f"--output-prefix {opts.output_prefix}: cannot create its directory "
                              f"({exc.strerror}).") from None
    try:
        with TargetLock(opts.output_prefix + LOCK_NAME):
            return _preprocess_locked(opts, stream, started, handler, files, skipped, prefixes, digest, jpath)
    except BaseException:
        if made and not os.listdir(out_dir):  # a refused run leaves nothing behind
            os.rmdir(out_dir)
        raise


def _preprocess_locked(opts, stream, started, handler, files, skipped, prefixes, digest, jpath) -> PreprocessResult:
    # One worker per thread of ours: keep the tokenizers library's own thread pool out of each call.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fileio.release_large_allocations()  # freed batch buffers go back to the OS (see fileio)

    records = _read_journal(jpath, digest)
    point = _resume_point(records, prefixes) if records else None
    committing = bool(records) and records[-1].get("kind") == "commit"
    counts = {k: 0 for k in COUNTERS}
    if committing:  # killed while renaming: everything was written, finish the renames
        indexed.commit(list(prefixes.values()))
        os.remove(jpath)
        counts.update(records[-1]["counts"])
        return PreprocessResult(dict(prefixes), counts, records[-1]["batches"], records[-1]["batches"],
                                time.monotonic() - started, skipped)
    if point is None:
        for prefix in prefixes.values():
            indexed.remove_partials(prefix)
        if os.path.exists(jpath):
            os.remove(jpath)
        _append(jpath, {"kind": "run", "digest": digest, "time": time.time()})
        start = (0, 0, 0)
    else:
        counts.update(point["counts"])
        start = (point["batch"] + 1, point["file"], point["row_end"])
        print(f"resuming after batch {point['batch']} ({counts['rows']} rows done)", file=stream, flush=True)
    resumed = start[0]

    writers = {}
    pipe = None
    try:
        for name, prefix in prefixes.items():
            writers[name] = indexed.IndexedWriter(prefix, resume_at=tuple(point["sizes"][name]) if point else None)
        batches = inputs.iter_batches(files, handler.columns, opts.batch_rows, start=start,
                                      max_row_bytes=opts.max_row_bytes)
        pipe = _Pipeline(handler, batches, writers, jpath, counts, opts.log_interval, stream)
        in_flight = 2 * opts.workers
        while not pipe.exhausted:
            dsk = _segment_graph(pipe, SEGMENT_BATCHES, in_flight)
            last = ("write", SEGMENT_BATCHES - 1)
            if opts.scheduler == "sync":
                dask.get(dsk, last)
            else:
                dask.threaded.get(dsk, last, num_workers=opts.workers)
        if counts["rows"] == 0:
            raise ValidationError(inputs.empty_input_message(files))
        for w in writers.values():
            w.finish()
    except (SourceError, ValidationError):
        # Bad input: the data must change before a rerun, so nothing here can be resumed.
        if pipe is not None:
            pipe.aborted = True
        for w in writers.values():
            w.close()
        for prefix in prefixes.values():
            indexed.remove_partials(prefix)
        if os.path.exists(jpath):
            os.remove(jpath)
        raise
    except BaseException:
        if pipe is not None:
            pipe.aborted = True
        for w in writers.values():  # killed, disk full, interrupted: keep the partial files to resume
            w.close()
        raise
    batches_total = resumed + pipe.written
    _append(jpath, {"kind": "commit", "counts": counts, "batches": batches_total})
    indexed.commit(list(prefixes.values()))
    os.remove(jpath)
    return PreprocessResult(dict(prefixes), counts, batches_total, resumed, time.monotonic() - started, skipped)
