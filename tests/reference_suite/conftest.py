"""Fixtures of the reference-converter suite: tiny DeepSeek-V3 HF checkpoints (tests/hf_tiny.py), made once per
module, and the loaded bf16 one."""

import pytest

from tests.hf_tiny import build_tiny_hf
from tests.reference import load_hf


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_bf16")
    build_tiny_hf(path)
    return str(path)


@pytest.fixture(scope="module")
def hf(bf16_dir):
    return load_hf(bf16_dir)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_fp8")
    build_tiny_hf(path, fp8=True)
    return str(path)


@pytest.fixture(scope="module")
def special_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_special")
    build_tiny_hf(path, special_values=True, seed=1)
    return str(path)
