"""MindSpeed-LLM convert_ckpt_v2.py's command line: `--load-model-type hf --save-model-type mg` (and back) as
synonyms of hf2mcore / mcore2hf, `--model-type-hf`, `--hf-cfg-dir`, and `--save-args` (the `args` namespace
the reference's mg -> hf reads back, which our mcore2hf reads too when no record is present)."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from streamconv import synth
from streamconv.cli.main import main, v2_synonym
from streamconv.errors import StreamconvError
from tests.e2e.test_mcore2hf import digest, load_dir
from tests.reference import load_mcore_dir


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen") / "hf")
    synth.synth_checkpoint(d, synth.preset("tiny", "qwen3_moe", max_shard_bytes=200_000))
    return d


def run(*argv):
    assert main(list(argv) + ["--no-progress"]) == 0


def test_synonym_rewrites_only_the_direction():
    assert v2_synonym(["convert", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", "a"]) == [
        "convert", "hf2mcore", "--load-dir", "a"]
    assert v2_synonym(["-v", "plan", "--save-model-type=hf", "--load-model-type=mg", "-o", "p"]) == [
        "-v", "plan", "mcore2hf", "-o", "p"]
    assert v2_synonym(["convert", "hf2mcore", "--load-dir", "a"]) == ["convert", "hf2mcore", "--load-dir", "a"]
    assert v2_synonym(["data", "preprocess", "--input", "x"]) == ["data", "preprocess", "--input", "x"]
    # mg -> mg is resharding (MindSpeed's convert_ckpt.py spells it so too)
    assert v2_synonym(["convert", "--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", "a"]) == [
        "convert", "mcore2mcore", "--load-dir", "a"]
    with pytest.raises(StreamconvError, match="streamconv converts hf -> mg, mg -> hf and mg -> mg"):
        v2_synonym(["convert", "--load-model-type", "hf", "--save-model-type", "hf"])
    with pytest.raises(StreamconvError, match="mcore2hf contradicts --load-model-type hf --save-model-type mg"):
        v2_synonym(["convert", "mcore2hf", "--load-model-type", "hf", "--save-model-type", "mg"])


def test_bad_pair_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "--load-model-type", "hf", "--save-model-type", "hf", "--load-dir", "x",
                 "--save-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("streamconv: error: --load-model-type hf --save-model-type hf")
    assert not out.exists()


def test_v2_scripts_port_by_changing_the_program_name(qwen, tmp_path):
    ours, v2 = str(tmp_path / "ours"), str(tmp_path / "v2")
    layout = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
              "--target-expert-parallel-size", "2", "--moe-grouped-gemm"]
    run("convert", "hf2mcore", "--load-dir", qwen, "--save-dir", ours, *layout)
    run("convert", "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "qwen3-moe",
        "--load-dir", qwen, "--save-dir", v2, *layout)
    for rel in ("iter_0000001/mp_rank_00_000_000/model_optim_rng.pt", "iter_0000001/mp_rank_01_001_001/model_optim_rng.pt"):
        assert open(os.path.join(ours, rel), "rb").read() == open(os.path.join(v2, rel), "rb").read()


def test_save_args_and_mg_to_hf_from_them(qwen, tmp_path):
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    run("convert", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", qwen, "--save-dir", mg,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
        "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--num-layer-list", "1,3", "--save-args")
    rank = os.path.join(mg, "iter_0000001", "mp_rank_01_001_001", "model_optim_rng.pt")
    # as documented: args need an allowlist (checked in a fresh interpreter: importing megatron.core, as other
    # tests do, allowlists argparse.Namespace process-wide)
    probe = subprocess.run([sys.executable, "-c", f"import torch; torch.load({rank!r}, weights_only=True)"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "argparse.Namespace" in probe.stderr
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(rank, weights_only=True)
        got = load_mcore_dir(mg)
    a = vars(obj["args"])
    assert (a["tensor_model_parallel_size"], a["pipeline_model_parallel_size"], a["expert_model_parallel_size"]) == (2, 2, 2)
    assert a["num_layer_list"] == "1,3" and a["num_layers"] == 4 and a["qkv_type"] == "unpack"
    assert a["num_key_value_heads"] == 4 and a["kv_channels"] == 16 and a["qk_layernorm"] is True
    assert a["untie_embeddings_and_output_weights"] is True and a["router_bias"] is False
    # the tensors are those of a run without --save-args
    plain = str(tmp_path / "plain")
    run("convert", "hf2mcore", "--load-dir", qwen, "--save-dir", plain, "--target-tensor-parallel-size", "2",
        "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2", "--moe-grouped-gemm",
        "--num-layer-list", "1,3")
    want = load_mcore_dir(plain)
    assert got.keys() == want.keys()
    for path, obj in want.items():
        if isinstance(obj, dict):
            assert set(got[path]) == set(obj) | {"args"}
            for name, t in obj["model"].items():
                assert digest(got[path]["model"][name]) == digest(t), (path, name)
    # mg -> hf as MindSpeed's v2 does it: sizes and layer list from the args, the rest from the command line
    os.remove(os.path.join(mg, "streamconv_source.json"))
    run("convert", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back,
        "--hf-cfg-dir", qwen, "--moe-grouped-gemm", "--model-type-hf", "qwen3-moe")
    src, out = load_dir(qwen), load_dir(back)
    assert sorted(src) == sorted(out) and all(digest(out[k]) == digest(v) for k, v in src.items())
