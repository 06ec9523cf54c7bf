"""Megatron-Core's own IndexedDataset reads what streamconv writes (one import of megatron for the module:
it takes several seconds)."""

import warnings

import numpy as np
import pytest

from streamconv.data.preprocess import PreprocessOptions, preprocess

from . import reference as ref
from .corpus import alpaca_rows, pretrain_texts, write_jsonl, write_parquet


@pytest.fixture(scope="module")
def IndexedDataset():
    pytest.importorskip("megatron.core")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset


def _check(ds, seqs):
    assert len(ds) == len(seqs)
    assert ds.sequence_lengths.tolist() == [len(s) for s in seqs]
    assert ds.document_indices.tolist() == list(range(len(seqs) + 1))
    for i in range(len(seqs)):
        assert ds[i].dtype == np.int32
        assert ds[i].tolist() == seqs[i]


def test_pretrain_and_instruction_outputs(tmp_path, tok_dir, hf_tok, IndexedDataset):
    rows = [{"text": t} for t in pretrain_texts(80)]
    path = write_parquet(str(tmp_path / "p.parquet"), rows)
    preprocess(PreprocessOptions(input=path, tokenizer_name_or_path=tok_dir, output_prefix=str(tmp_path / "enwiki"),
                                 append_eod=True, workers=2, batch_rows=9, log_interval=0))
    _check(IndexedDataset(str(tmp_path / "enwiki_text_document")), ref.pretrain_docs(rows, hf_tok))

    arows = alpaca_rows(50)
    apath = write_jsonl(str(tmp_path / "a.jsonl"), arows)
    preprocess(PreprocessOptions(input=apath, tokenizer_name_or_path=tok_dir, output_prefix=str(tmp_path / "alpaca"),
                                 handler_name="AlpacaStyleInstructionHandler", prompt_type="deepseek3",
                                 workers=2, batch_rows=8, log_interval=0))
    samples = ref.instruction_samples(arows, hf_tok)
    _check(IndexedDataset(str(tmp_path / "alpaca_packed_input_ids_document")), [s[0] for s in samples])
    _check(IndexedDataset(str(tmp_path / "alpaca_packed_labels_document")), [s[1] for s in samples])
    _check(IndexedDataset(str(tmp_path / "alpaca_packed_attention_mask_document")), [[1] * len(s[0]) for s in samples])
    assert any(-100 in s[1] for s in samples)
