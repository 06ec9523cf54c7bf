"""verify sees every byte: a flipped byte anywhere in a written .pt (data, pickle, local headers, central
directory, end record) or safetensors file fails `verify PLAN` and `verify DIR`; an interrupted output is
reported incomplete; a journal never makes verify read outside the save dir."""

import json
import os
import shutil
import struct
import zipfile

import pytest

from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.plan import Plan
from streamconv.storage.registry import get_format

RANK = "iter_0000001/mp_rank_00_000/model_optim_rng.pt"


@pytest.fixture(scope="module")
def written(world, tmp_path_factory):
    """A finished output and its plan, to copy and damage."""
    plan = Plan.load(world["plan"])
    out = str(tmp_path_factory.mktemp("written") / "out")
    plan = Plan(**{**plan.__dict__, "target_root": out})
    run_plan(plan, RunOptions())
    return plan


def damaged(plan, tmp_path, flip=None):
    """The plan's output written under tmp_path (and the plan saved there), with one byte of
    ``flip = (rel path, offset)`` flipped."""
    out = str(tmp_path / "out")
    copy = Plan(**{**plan.__dict__, "target_root": out})
    run_plan(copy, RunOptions())
    copy.save(str(tmp_path / "plan.json"))
    if flip:
        rel, offset = flip
        path = os.path.join(out, rel)
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x01]))
    return str(tmp_path / "plan.json"), out


def pt_positions(path):
    """One byte offset in each class of a .pt file written by streamconv."""
    with zipfile.ZipFile(path) as z:
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
    data0 = infos["data/0"]
    pkl = infos["data.pkl"]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(size - 22)
        eocd = f.read(22)
    cd_offset = struct.unpack("<IHHHHIIH", eocd)[6]
    if cd_offset == 0xFFFFFFFF:  # zip64: take the offset from the zip64 end record
        with zipfile.ZipFile(path) as z:
            cd_offset = z.start_dir
    def data_start(info):
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)
        n, m = struct.unpack("<HH", head[26:30])
        return info.header_offset + 30 + n + m
    return {
        "data record": data_start(data0) + 1,
        "pickle": data_start(pkl) + pkl.file_size // 2,
        "local header": data0.header_offset + 30,     # first byte of the record's file name
        "central directory": cd_offset + 46 + 2,      # inside the first entry's file name
        "end record": size - 22 + 10,                 # total entries field of the end record
    }


@pytest.mark.parametrize("where", ["data record", "pickle", "local header", "central directory", "end record"])
def test_a_flipped_byte_in_a_pt_fails_verify_plan_and_verify_dir(written, tmp_path, cli, where):
    offset = pt_positions(os.path.join(written.target_root, RANK))[where]
    plan, out = damaged(written, tmp_path, (RANK, offset))
    code, _ = cli("verify", plan)
    assert code == 1, where
    code, _ = cli("verify", out)
    assert code == 1, where


def test_an_intact_output_verifies(written, tmp_path, cli):
    plan, out = damaged(written, tmp_path)
    assert cli("verify", plan)[0] == 0
    assert cli("verify", out)[0] == 0


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_flipped_byte_in_safetensors_output_fails_verify_dir(world, tmp_path, cli, where):
    out = str(tmp_path / "hf")
    plan = plan_mcore_to_hf(world["mcore"], out, ParallelSizes(2, 2, 1), McoreOptions(moe_grouped_gemm=True))
    run_plan(plan, RunOptions())
    shard = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]
    path = os.path.join(out, shard)
    (n,) = struct.unpack("<Q", open(path, "rb").read(8))
    offset = 8 + n // 2 if where == "header" else os.path.getsize(path) - 3
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))
    assert cli("verify", out)[0] == 1


def test_an_interrupted_output_is_incomplete(world, tmp_path, cli, monkeypatch):
    plan = Plan.load(world["plan"])
    plan = Plan(**{**plan.__dict__, "target_root": str(tmp_path / "out")})
    fmt = get_format("megatron_pt")
    finish, calls = fmt.finish, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return finish(*a, **k)

    monkeypatch.setattr(fmt, "finish", dying)
    with pytest.raises(Exception):
        run_plan(plan, RunOptions(num_workers=1))
    monkeypatch.undo()
    code, _ = cli("verify", tmp_path / "out")
    assert code == 1 and "INCOMPLETE" in cli.out and "incomplete" in cli.out
    (tmp_path / "out" / "x.pt.partial").write_bytes(b"left by a killed run")
    code, _ = cli("verify", tmp_path / "out")
    assert code == 1 and "temporary files of an interrupted run" in cli.out


def test_a_journal_naming_paths_outside_the_dir_is_refused(written, tmp_path, cli):
    _, out = damaged(written, tmp_path)
    with open(os.path.join(out, ".streamconv_journal.jsonl"), "a") as f:
        f.write(json.dumps({"kind": "file", "path": "../../etc/hostname", "size": 10, "crc32": [0]}) + "\n")
    code, _ = cli("verify", out)
    assert code == 1 and "outside the save dir" in cli.out


def test_a_symlinked_subdirectory_is_not_followed(written, tmp_path, cli):
    _, out = damaged(written, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(os.path.join(out, "iter_0000001"), elsewhere)
    os.symlink(elsewhere, os.path.join(out, "iter_0000001"))
    code, _ = cli("verify", out)
    assert code == 1 and "leaves the save dir through a symlink; not read" in cli.out
