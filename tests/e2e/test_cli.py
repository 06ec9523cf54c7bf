"""The command line: MindSpeed flag names, --dry-run writes nothing, errors are one line with status 2."""

import os
import subprocess
import sys


from streamconv.cli.main import main
from tests.reference import assert_same_checkpoint, load_mcore_dir, reference_hf_to_mcore

FLAGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
         "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--mtp-num-layers", "1"]


def test_plan_then_run(tiny_hf, tmp_path, capsys):
    out, plan = str(tmp_path / "mcore"), str(tmp_path / "plan.json")
    assert main(["plan", "hf2mcore", "--load-dir", tiny_hf["fp8"], "--save-dir", out, *FLAGS, "-o", plan]) == 0
    assert not os.path.exists(out)
    text = capsys.readouterr().out
    assert "iter_0000001/mp_rank_01_001_001/model_optim_rng.pt" in text and "plan saved" in text
    assert main(["run", plan, "--max-memory", "8MiB", "--workers", "2"]) == 0
    expected = reference_hf_to_mcore(tiny_hf["fp8"], tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=1)
    assert_same_checkpoint(load_mcore_dir(out), expected)
    assert "wrote 10 files" in capsys.readouterr().out  # 8 rank files, the record, the tracker


def test_convert_and_inspect(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "mcore")
    assert main(["convert", "hf2mcore", "--load-dir", tiny_hf["bf16"], "--save-dir", out,
                 "--target-expert-parallel-size", "4", "--plan-output", str(tmp_path / "p.json")]) == 0
    assert os.path.exists(tmp_path / "p.json")
    capsys.readouterr()
    assert main(["inspect", out, "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "iter_0000001/mp_rank_00_003" in text and "decoder.layers.3.mlp.experts.local_experts.1" in text
    assert main(["inspect", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "dropped source tensors" in text and "MTP layer 0 not requested" in text
    assert main(["inspect", tiny_hf["bf16"]]) == 0
    assert "HF checkpoint" in capsys.readouterr().out


def test_dry_run_writes_nothing(tiny_hf, tmp_path, capsys):
    out, plan = str(tmp_path / "mcore"), str(tmp_path / "plan.json")
    assert main(["plan", "hf2mcore", "--load-dir", tiny_hf["fp8"], "--save-dir", out, "-o", plan, "--dry-run"]) == 0
    assert not os.path.exists(plan)
    assert main(["convert", "hf2mcore", "--load-dir", tiny_hf["fp8"], "--save-dir", out, "--dry-run"]) == 0
    assert not os.path.exists(out)
    assert main(["plan", "hf2mcore", "--load-dir", tiny_hf["fp8"], "--save-dir", out, "-o", plan]) == 0
    assert main(["run", plan, "--dry-run"]) == 0
    assert not os.path.exists(out)
    assert "nothing written" in capsys.readouterr().out


def test_error_is_one_line_with_status_2(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "mcore")
    code = main(["convert", "hf2mcore", "--load-dir", tiny_hf["fp8"], "--save-dir", out,
                 "--target-expert-parallel-size", "3"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["streamconv: error: --target-expert-parallel-size 3 does not divide n_routed_experts = 8. "
                   "Choose a size that divides it."]
    assert not os.path.exists(out)
    assert main(["run", str(tmp_path / "nope.json")]) == 2
    assert "plan file not found" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    """`python -m streamconv` runs the same main (what the installed `streamconv` script calls)."""
    r = subprocess.run([sys.executable, "-m", "streamconv", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("synth", "plan", "run", "convert", "inspect"):
        assert cmd in r.stdout
