"""Row batches from the input corpus, in order, never a whole file in memory.

Supported inputs (``--input``): one file, or a directory whose ``*.parquet``, ``*.jsonl`` and ``*.json`` files
are read in sorted name order (hidden files and other extensions are skipped and reported).

- ``.parquet``: ``ParquetFile.iter_batches`` over the needed columns only.
- ``.jsonl``: one JSON object per line, read line by line; blank lines are skipped.
- ``.json``: either JSON lines (the first non-blank character is ``{``, as ``datasets`` accepts) or one
  top-level array of objects, decoded incrementally object by object (``[ {...}, {...} ]``).

Batches hold ``batch_rows`` rows (the last one of each file fewer) and never span files, so batch k of a
corpus is the same whatever the worker count, and a resumed run can start at (file, row).  Row numbers are
0-based within their file; JSON inputs also carry the 1-based line of each row for messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import SourceError, ValidationError

EXTENSIONS = (".parquet", ".jsonl", ".json")


class _Missing:
    """A row without the column (JSON objects only; parquet columns are checked up front)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@dataclass
class Batch:
    index: int                     # position in the corpus (0-based, over all files)
    file_index: int
    path: str
    first_row: int                 # row number of the batch's first row within its file
    columns: dict[str, list]       # column -> values (None for null, MISSING for an absent key)
    lines: list[int] | None = field(default=None)  # 1-based line of each row (JSON inputs)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, i: int) -> str:
        """'file: row R' (and the line for JSON) of row i of the batch, for messages."""
        row = self.first_row + i
        line = f" (line {self.lines[i]})" if self.lines else ""
        return f"{self.path}: row {row}{line}"


def list_inputs(path: str) -> tuple[list[str], list[str]]:
    """(files to read in order, files skipped) for ``--input`` PATH; raises when nothing can be read."""
    if os.path.isfile(path):
        if not path.endswith(EXTENSIONS):
            raise ValidationError(f"{path}: unsupported input type (expected one of {', '.join(EXTENSIONS)}). "
                                  f"Convert it to parquet or JSON lines.")
        return [path], []
    if not os.path.isdir(path):
        raise ValidationError(f"{path}: no such input file or directory. Check --input.")
    files, skipped = [], []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        (files if name.endswith(EXTENSIONS) else skipped).append(full)
    if not files:
        raise ValidationError(f"{path}: no input files in the directory (expected *.parquet, *.jsonl or *.json). "
                              f"Check --input.")
    return files, skipped


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValidationError("reading parquet needs pyarrow: pip install 'streamconv[data]'.") from None
    return pq


def check_inputs(files: list[str], columns: list[str]) -> int | None:
    """Checks that need no full read, all problems at once: parquet files open and hold ``columns``, and the
    input is not plainly empty.  Returns the total row count when every file is parquet (else None: JSON rows
    are counted while reading)."""
    pq = _parquet() if any(p.endswith(".parquet") for p in files) else None

    problems, total, all_parquet = [], 0, True
    for path in files:
        if not path.endswith(".parquet"):
            all_parquet = False
            total += os.path.getsize(path) > 0  # a non-empty JSON file may hold rows
            continue
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            problems.append(f"{path}: not a readable parquet file ({exc}). Re-copy or re-export it.")
            continue
        names = pf.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            problems.append(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}). "
                            f"Pass --json-keys / --map-keys naming the file's columns.")
        total += pf.metadata.num_rows
    if problems:
        raise ValidationError(problems)
    if total == 0:
        raise ValidationError(empty_input_message(files))
    return total if all_parquet else None


def empty_input_message(files: list[str]) -> str:
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"{shown}: no rows in the input (expected at least one). Check --input."


class TooLarge:
    """Stands for a JSON-lines row longer than the cap: it is never read into memory whole."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit

    def __repr__(self) -> str:
        return f"<row of {self.size} bytes>"


def iter_batches(files: list[str], columns: list[str], batch_rows: int, *, start: tuple[int, int, int] = (0, 0, 0),
                 max_row_bytes: int | None = None):
    """Yield :class:`Batch` es of the corpus in order.  ``start`` = (batch index, file index, row in that
    file) resumes after a journaled batch without decoding the rows before it where the format allows."""
    index, first_file, first_row = start
    for fi in range(first_file, len(files)):
        path = files[fi]
        skip = first_row if fi == first_file else 0
        if path.endswith(".parquet"):
            rows = _parquet_rows(path, columns, batch_rows, skip)
        else:
            rows = _json_rows(path, columns, batch_rows, skip, max_row_bytes)
        for row0, cols, lines in rows:
            yield Batch(index, fi, path, row0, cols, lines)
            index += 1


def _parquet_rows(path: str, columns: list[str], batch_rows: int, skip: int):
    pf = _parquet().ParquetFile(path)
    groups, row = [], 0
    for g in range(pf.metadata.num_row_groups):  # whole row groups before ``skip`` are never decoded
        n = pf.metadata.row_group(g).num_rows
        if not groups and row + n <= skip:
            row += n
            continue
        groups.append(g)
    drop = skip - row
    pending: dict[str, list] = {c: [] for c in columns}
    first = skip
    if groups:
        for rb in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            if drop >= rb.num_rows:
                drop -= rb.num_rows
                continue
            if drop:
                rb, drop = rb.slice(drop), 0
            for c in columns:
                pending[c].extend(rb.column(c).to_pylist())
            while len(pending[columns[0]]) >= batch_rows:
                yield first, {c: v[:batch_rows] for c, v in pending.items()}, None
                pending = {c: v[batch_rows:] for c, v in pending.items()}
                first += batch_rows
    if pending[columns[0]]:
        yield first, pending, None


def _json_rows(path: str, columns: list[str], batch_rows: int, skip: int, max_row_bytes: int | None = None):
    cols: dict[str, list] = {c: [] for c in columns}
    lines: list[int] = []
    row = first = skip
    for line, obj in _json_objects(path, skip, max_row_bytes):
        if isinstance(obj, TooLarge):  # every column of the row is bad: the handler reports or skips it
            obj = {c: obj for c in columns}
        if not isinstance(obj, dict):
            raise SourceError(f"{path}: row {row} (line {line}): a JSON {type(obj).__name__}, expected an object "
                              f"with keys {', '.join(columns)}. Fix the row.")
        for c in columns:
            cols[c].append(obj.get(c, MISSING))
        lines.append(line)
        row += 1
        if len(lines) == batch_rows:
            yield first, cols, lines
            cols, lines, first = {c: [] for c in columns}, [], row
    if lines:
        yield first, cols, lines


def _json_objects(path: str, skip: int, max_row_bytes: int | None = None):
    """(1-based line, decoded value) of each row of a JSON-lines or JSON-array file, the first ``skip`` rows
    passed over (JSON lines: without decoding them).  A JSON line longer than ``max_row_bytes`` is never held
    whole: it is read past in chunks and given as a :class:`TooLarge`."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head and f.tell() < os.fstat(f.fileno()).st_size:
            head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            yield from _json_array(path, f, skip)
            return
        row = 0
        for n, raw in enumerate(_lines(f, max_row_bytes), 1):
            if isinstance(raw, TooLarge):
                if row >= skip:
                    yield n, raw
                row += 1
                continue
            if not raw.strip():
                continue
            if row >= skip:
                try:
                    yield n, json.loads(raw)
                except RecursionError:
                    raise SourceError(f"{path}: line {n}: JSON nested too deeply to be a dataset row. Fix the "
                                      f"line.") from None
                except ValueError as exc:
                    raise SourceError(f"{path}: line {n}: invalid JSON ({exc}). Fix the line "
                                      f"(one JSON object per line).") from None
            row += 1


def _lines(f, limit: int | None):
    """The lines of a binary file; a line longer than ``limit`` bytes becomes a :class:`TooLarge` (read past in
    chunks, never held)."""
    if limit is None:
        yield from f
        return
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or (len(line) == limit + 1 and line.endswith(b"\n")):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = f.readline(1 << 20)
            if not line:
                break
            size += len(line)
        yield TooLarge(size, limit)


def _json_array(path: str, f, skip: int, chunk: int = 1 << 20):
    """Decode ``[obj, obj, ...]`` one element at a time from chunks of the file (bounded memory: one chunk
    plus the element being decoded)."""
    decoder = json.JSONDecoder()
    buf, pos, line, row = "", 0, 1, 0
    eof = False
    pending = b""

    def more() -> bool:
        nonlocal buf, pos, eof, pending
        if eof:
            return False
        data = pending + f.read(chunk)
        if len(data) == len(pending):
            eof = True
            if pending:
                raise SourceError(f"{path}: ends inside a UTF-8 character. Re-copy the file.")
            return False
        try:
            text, pending = data.decode("utf-8"), b""
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 4:
                raise SourceError(f"{path}: invalid UTF-8 at byte {exc.start}. Fix the file's encoding.") from None
            text, pending = data[: exc.start].decode("utf-8"), data[exc.start:]
        buf = buf[pos:] + text
        pos = 0
        return True

    def skip_space() -> None:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf) or not more():
                return

    skip_space()
    if pos >= len(buf) or buf[pos] != "[":
        raise SourceError(f"{path}: expected a JSON array or JSON lines. Fix the file.")
    pos += 1
    first = True
    while True:
        skip_space()
        if pos >= len(buf):
            raise SourceError(f"{path}: line {line}: the JSON array is not closed (truncated file?). Re-copy it.")
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                raise SourceError(f"{path}: line {line}: expected ',' or ']' between array elements. Fix the file.")
            pos += 1
            skip_space()
        first = False
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except RecursionError:
                raise SourceError(f"{path}: line {line}: JSON nested too deeply to be a dataset row. Fix the "
                                  f"element.") from None
            except ValueError as exc:
                if not more():
                    raise SourceError(f"{path}: line {line}: invalid JSON ({exc.msg}). Fix the element.") from None
        start_line = line
        line += buf.count("\n", pos, end)
        pos = end
        if row >= skip:
            yield start_line, obj
        row += 1
