"""Batches of every input format: the same rows as a whole-file read, and a resumed iteration (start after
batch k) gives exactly the remaining batches."""

import pytest

from streamconv.data import inputs

from . import reference as ref
from .corpus import pretrain_texts, write_json_array, write_jsonl, write_parquet

ROWS = [{"text": t} for t in pretrain_texts(97)]


@pytest.fixture(params=["parquet", "jsonl", "json"])
def corpus(request, tmp_path):
    if request.param == "parquet":  # uneven row groups: batches straddle them, the last group is short
        return write_parquet(str(tmp_path / "c.parquet"), ROWS, row_group_size=13)
    if request.param == "jsonl":
        return write_jsonl(str(tmp_path / "c.jsonl"), ROWS, blank_lines=True)
    return write_json_array(str(tmp_path / "c.json"), ROWS)


def test_batches_cover_the_file_in_order(corpus):
    batches = list(inputs.iter_batches([corpus, corpus], ["text"], 10))
    assert [b.index for b in batches] == list(range(len(batches)))
    assert [t for b in batches for t in b.columns["text"]] == [r["text"] for r in ref.read_rows(corpus)] * 2
    assert {len(b) for b in batches} == {10, 7} and all(b.first_row % 10 == 0 for b in batches)


def test_resumed_iteration_gives_the_remaining_batches(corpus):
    files = [corpus, corpus]
    full = list(inputs.iter_batches(files, ["text"], 10))
    for k in range(len(full) - 1):
        b = full[k]
        rest = list(inputs.iter_batches(files, ["text"], 10, start=(k + 1, b.file_index, b.first_row + len(b))))
        assert [(r.index, r.file_index, r.first_row, r.columns, r.lines) for r in rest] == \
               [(r.index, r.file_index, r.first_row, r.columns, r.lines) for r in full[k + 1:]]


def test_jsonl_rows_know_their_lines(tmp_path):
    path = write_jsonl(str(tmp_path / "l.jsonl"), ROWS[:12], blank_lines=True)  # a blank line after rows 0, 5 and 10
    (batch,) = inputs.iter_batches([path], ["text"], 100)
    assert batch.where(0) == f"{path}: row 0 (line 1)"
    assert batch.where(6) == f"{path}: row 6 (line 9)"
