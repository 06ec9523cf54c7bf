import pytest

from .corpus import build_tokenizer


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A DeepSeek-V3-style tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    return build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    """The same tokenizer loaded directly with the tokenizers library (the reference's)."""
    import os

    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
