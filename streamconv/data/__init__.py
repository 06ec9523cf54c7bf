"""Dataset conversion: text corpora (parquet, JSON, JSONL) to Megatron indexed datasets (``.bin``/``.idx``).

    indexed.py     the MMIDIDX v1 format: a streaming writer (``.bin`` appended, ``.idx`` written last), a reader
    inputs.py      row batches from parquet / JSON / JSONL files or a directory of them, with file and row
    tokenizer.py   offline HF tokenizer through the ``tokenizers`` library (tokenizer.json + tokenizer_config.json)
    templates.py   prompt templates as data (the instruction handler's chat format)
    handlers.py    rows -> token sequences: the pretrain handler and the Alpaca-style instruction handler
    preprocess.py  the pipeline: Dask tokenization in order, atomic outputs, resume journal
    inspect.py     a text summary of an indexed dataset

Imports only ``errors`` and ``storage`` from the rest of streamconv: nothing here knows about checkpoints.
"""
