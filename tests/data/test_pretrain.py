"""GeneralPretrainHandler: byte equality with the eager reference (tests/data/reference.py) on every input
format, for several worker counts and batch sizes; bad input reported with file and row."""

import os

import pytest

from streamconv.data.preprocess import PreprocessOptions, preprocess
from streamconv.errors import StreamconvError, ValidationError

from . import reference as ref
from .corpus import pretrain_texts, write_json_array, write_jsonl, write_parquet

ROWS = [{"text": t, "other": i} for i, t in enumerate(pretrain_texts(150))]


def run(tmp_path, inp, tok_dir, name="out", **kw):
    kw.setdefault("append_eod", True)
    kw.setdefault("log_interval", 0)
    opts = PreprocessOptions(input=str(inp), tokenizer_name_or_path=tok_dir,
                             output_prefix=str(tmp_path / name / "enwiki"), **kw)
    return preprocess(opts), str(tmp_path / name / "enwiki_text_document")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json"])
def test_bytes_equal_the_reference(tmp_path, tok_dir, hf_tok, fmt):
    write = {"parquet": write_parquet, "jsonl": write_jsonl, "json": write_json_array}[fmt]
    path = write(str(tmp_path / f"train.{fmt}"), ROWS)
    result, prefix = run(tmp_path, path, tok_dir, batch_rows=16, workers=2)
    want = ref.indexed_bytes(ref.pretrain_docs(ref.read_rows(path), hf_tok))
    assert ref.read_pair(prefix) == want
    empty = sum(r["text"] == "" for r in ROWS)
    assert empty > 0 and result.counts["rows"] == len(ROWS) and result.counts["documents"] == len(ROWS) - empty
    assert sorted(os.listdir(tmp_path / "out")) == ["enwiki_text_document.bin", "enwiki_text_document.idx"]


def test_output_does_not_depend_on_workers_or_batches(tmp_path, tok_dir):
    path = write_parquet(str(tmp_path / "t.parquet"), ROWS, row_group_size=11)
    outs = []
    for i, (workers, batch, sched) in enumerate([(1, 1000, "threads"), (2, 7, "threads"), (3, 1, "threads"),
                                                 (1, 5, "sync")]):
        _, prefix = run(tmp_path, path, tok_dir, name=f"o{i}", workers=workers, batch_rows=batch, scheduler=sched)
        outs.append(ref.read_pair(prefix))
    assert all(o == outs[0] for o in outs[1:])


def test_without_append_eod_and_spec_cases(tmp_path, tok_dir, hf_tok):
    """Whitespace-only -> [BOS, token(s)] (+EOD); literal special strings -> their ids; empty -> no document."""
    rows = [{"text": " "}, {"text": ""}, {"text": "x <｜end▁of▁sentence｜> y"}, {"text": "<｜User｜>"}]
    path = write_jsonl(str(tmp_path / "s.jsonl"), rows)
    _, prefix = run(tmp_path, path, tok_dir, name="eod")
    _, prefix_no = run(tmp_path, path, tok_dir, name="noeod", append_eod=False)
    docs = ref.pretrain_docs(rows, hf_tok)
    assert ref.read_pair(prefix) == ref.indexed_bytes(docs)
    assert ref.read_pair(prefix_no) == ref.indexed_bytes(ref.pretrain_docs(rows, hf_tok, append_eod=False))
    assert docs[0][0] == 0 and docs[0][-1] == 1 and len(docs[0]) == 3  # BOS, 'Ġ', EOD
    assert 1 in docs[1][1:-1] and docs[2] == [0, 2, 1]                 # literal specials are their ids


def test_directory_input_in_name_order_and_multiple_keys(tmp_path, tok_dir, hf_tok):
    d = tmp_path / "corpus"
    d.mkdir()
    rows = [{"text": r["text"], "title": f"title {i}"} for i, r in enumerate(ROWS)]
    write_parquet(str(d / "b.parquet"), rows[60:])
    write_jsonl(str(d / "a.jsonl"), rows[:60])
    (d / "README.md").write_text("not data")
    result, prefix = run(tmp_path, d, tok_dir, json_keys=("text", "title"), batch_rows=9, workers=2)
    assert result.skipped_files == [str(d / "README.md")]
    assert ref.read_pair(prefix) == ref.indexed_bytes(ref.pretrain_docs(rows, hf_tok))
    title = str(tmp_path / "out" / "enwiki_title_document")
    assert ref.read_pair(title) == ref.indexed_bytes(ref.pretrain_docs(rows, hf_tok, key="title"))


@pytest.mark.parametrize("fmt, where", [("parquet", "row 20"), ("jsonl", "row 20 (line 21)")])
def test_null_text_names_file_and_row_and_writes_nothing(tmp_path, tok_dir, fmt, where):
    rows = [{"text": f"row {i}"} for i in range(40)]
    rows[20]["text"] = None
    path = (write_parquet if fmt == "parquet" else write_jsonl)(str(tmp_path / f"n.{fmt}"), rows)
    with pytest.raises(StreamconvError) as err:
        run(tmp_path, path, tok_dir, batch_rows=8)
    msg = str(err.value)
    assert f"{path}: {where}: column 'text' is null" in msg and "--skip-bad-rows" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # partials, journal and the directory made for them: nothing left


def test_skip_bad_rows_counts_them(tmp_path, tok_dir, hf_tok):
    rows = [{"text": f"row {i}"} for i in range(30)]
    bad = [3, 17, 29]
    for i in bad:
        rows[i]["text"] = None
    rows[5] = {"text": 12}  # not a string either (JSON only)
    path = write_jsonl(str(tmp_path / "b.jsonl"), rows)
    result, prefix = run(tmp_path, path, tok_dir, batch_rows=4, skip_bad_rows=True)
    kept = [r for i, r in enumerate(rows) if i not in bad + [5]]
    assert result.counts["skipped_bad_rows"] == 4
    assert ref.read_pair(prefix) == ref.indexed_bytes(ref.pretrain_docs(kept, hf_tok))


def test_missing_column_is_reported_before_anything_is_written(tmp_path, tok_dir):
    path = write_parquet(str(tmp_path / "m.parquet"), [{"content": "x"}])
    with pytest.raises(ValidationError, match=r"m.parquet: no column 'text' \(columns: content\)"):
        run(tmp_path, path, tok_dir)
    assert not (tmp_path / "out").exists()
    jpath = write_jsonl(str(tmp_path / "m.jsonl"), [{"content": "x"}])
    with pytest.raises(StreamconvError, match=r"m.jsonl: row 0 \(line 1\): no key 'text' in the row"):
        run(tmp_path, jpath, tok_dir)


def test_empty_inputs_are_errors(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "e.parquet"))
    with pytest.raises(ValidationError, match="no rows in the input"):
        run(tmp_path, tmp_path / "e.parquet", tok_dir)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValidationError, match="no rows in the input"):
        run(tmp_path, tmp_path / "blank.jsonl", tok_dir)
    assert not (tmp_path / "out").exists()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValidationError, match="no input files in the directory"):
        run(tmp_path, tmp_path / "nothing", tok_dir)


def test_bad_json_names_the_line(tmp_path, tok_dir):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(StreamconvError, match=r"bad.jsonl: line 2: invalid JSON"):
        run(tmp_path, p, tok_dir)
    p = tmp_path / "bad.json"
    p.write_text('[{"text": "a"},\n {"text": "b"} {"text": "c"}]')
    with pytest.raises(StreamconvError, match=r"bad.json: line 2: expected ',' or ']'"):
        run(tmp_path, p, tok_dir)


def test_json_array_streams_across_chunks(tmp_path):
    """The incremental array decoder gives the same rows as json.load, with elements straddling chunks."""
    from streamconv.data import inputs

    rows = [{"text": t} for t in pretrain_texts(60)]
    path = write_json_array(str(tmp_path / "a.json"), rows)
    with open(path, "rb") as f:
        got = [obj for _, obj in inputs._json_array(path, f, 0, chunk=37)]
    assert got == rows
    with open(path, "rb") as f:
        assert [obj for _, obj in inputs._json_array(path, f, 45, chunk=64)] == rows[45:]
