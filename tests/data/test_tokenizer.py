"""The offline tokenizer: config flags and tokenizer.json post-processor agree; transformers' own loading of
the same directory gives the same ids (where it does not fall into the transformers >= 5 pitfall)."""

import json
import os
import shutil

import pytest

from streamconv.data.tokenizer import Tokenizer
from streamconv.errors import SourceError

from .corpus import BOS, EOS, build_tokenizer, pretrain_texts

TEXTS = [t for t in pretrain_texts(60) if t] + [f"x{EOS}y", f"{BOS}", "  lead and trail  "]


def test_call_adds_bos_like_the_hf_call(tok_dir, hf_tok):
    tok = Tokenizer(tok_dir)
    assert (tok.info.bos_id, tok.info.eos_id, tok.info.add_bos, tok.info.add_eos) == (0, 1, True, False)
    assert tok.encode_call(TEXTS) == [hf_tok.encode(t).ids for t in TEXTS]
    assert tok.encode_plain(TEXTS) == [hf_tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    assert tok.encode_plain([f"a{EOS}"])[0][-1] == 1  # literal special tokens are split out


def test_post_processor_is_used_when_the_config_states_no_flags(tmp_path, tok_dir, hf_tok):
    d = tmp_path / "pp"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for k in ("add_bos_token", "add_eos_token", "tokenizer_class"):
        cfg.pop(k)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(str(d))
    assert tok.info.add_bos is None
    assert tok.encode_call(TEXTS) == [hf_tok.encode(t).ids for t in TEXTS]


def test_config_flags_override_the_post_processor(tmp_path):
    """Like LlamaTokenizerFast: add_bos_token/add_eos_token decide, whatever tokenizer.json's post-processor says."""
    d = build_tokenizer(str(tmp_path / "t"), post_processor=False, config={"add_eos_token": True})
    tok = Tokenizer(d)
    ids = tok.encode_call(["hello world"])[0]
    assert ids[0] == 0 and ids[-1] == 1 and ids[1:-1] == tok.encode_plain(["hello world"])[0]


def test_transformers_fast_tokenizer_gives_the_same_ids(tmp_path, tok_dir):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "hf"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads tokenizer.json as it is
    for k in ("add_bos_token", "add_eos_token"):
        cfg.pop(k)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    auto = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    ours = Tokenizer(tok_dir)  # the DeepSeek-style config (LlamaTokenizerFast, add_bos_token)
    assert ours.encode_call(TEXTS) == [auto(t)["input_ids"] for t in TEXTS]
    assert ours.encode_plain(TEXTS) == [auto.encode(t, add_special_tokens=False) for t in TEXTS]


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no tokenizer.json in it"):
        Tokenizer(str(tmp_path))
    with pytest.raises(SourceError, match="no such directory"):
        Tokenizer(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(SourceError, match="cannot be loaded"):
        Tokenizer(str(tmp_path))
    assert not os.path.exists(tmp_path / "nope")
