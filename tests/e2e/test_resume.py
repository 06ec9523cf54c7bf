"""Never half-written: killed and failed runs resume to byte-identical outputs; verify finds corruption."""

import errno
import io
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from streamconv.cli.main import main
from streamconv.errors import ExecutionError, ValidationError
from streamconv.execute import journal
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.execute.verify import verify_dir, verify_plan
from streamconv.layout.parallel import ParallelSizes
from streamconv.layout.options import McoreOptions
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from streamconv.storage import fileio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_plan(hf, out):
    return plan_hf_to_mcore(hf, out, ParallelSizes(2, 2, 2), McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1))


def tree(root):
    """Every file under root except the journal, with its bytes."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f != journal.NAME:
                p = os.path.join(d, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_hf, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "mcore")
    run_plan(make_plan(tiny_hf["fp8"], out))
    return tree(out)


def journaled_files(root):
    return len(journal.read(root)[1]) if os.path.exists(journal.path_of(root)) else 0


@pytest.mark.parametrize("after_files", [0, 1, 4, 8])
def test_kill_9_then_resume_is_byte_identical(tiny_hf, tmp_path, uninterrupted, after_files):
    out = str(tmp_path / "mcore")
    plan_path = str(tmp_path / "plan.json")
    make_plan(tiny_hf["fp8"], out).save(plan_path)
    # One worker and tiny bands: the run takes long enough to be caught in the middle of a file.
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "run", plan_path, "--workers", "1",
                             "--max-memory", "4MiB", "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if journaled_files(out) >= after_files and (after_files or os.path.exists(out)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Nothing half-written under a final name: a final name holds a whole file (journaled, or killed between
    # its rename and its journal line), and the tracker appears only after every rank file.
    files = tree(out) if os.path.isdir(out) else {}
    for rel, data in files.items():
        if rel.endswith(".pt"):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                assert z.testzip() is None, rel
            assert data == uninterrupted[rel]
    if "latest_checkpointed_iteration.txt" in files:
        assert sum(rel.endswith(".pt") for rel in files) == 8
    run_plan(Plan.load(plan_path))  # resume
    assert tree(out) == uninterrupted
    assert verify_plan(Plan.load(plan_path), rederive=3).ok


def test_disk_full_stops_cleanly_and_resumes(tiny_hf, tmp_path, uninterrupted, monkeypatch):
    out = str(tmp_path / "mcore")
    plan = make_plan(tiny_hf["fp8"], out)
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fileio.os, "pwrite", full_disk)
    with pytest.raises(ExecutionError, match="disk full while writing. Free space and run the plan again"):
        run_plan(plan, RunOptions(scheduler="sync", band_bytes=4096, max_memory=4 << 20))
    monkeypatch.setattr(fileio.os, "pwrite", real_pwrite)
    leftovers = [p for p in tree(out) if p.endswith(".partial")]
    assert leftovers == [], "temporary files are removed after a failed run"
    assert not os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt"))
    run_plan(plan)  # space freed: resume
    assert tree(out) == uninterrupted


def test_verify_finds_corruption_and_missing_files(tiny_hf, tmp_path, capsys):
    out = str(tmp_path / "mcore")
    plan = make_plan(tiny_hf["fp8"], out)
    plan_path = str(tmp_path / "plan.json")
    plan.save(plan_path)
    run_plan(plan)
    rep = verify_plan(plan, rederive=10)
    assert rep.ok and rep.files == 10 and rep.records == plan.tensor_count and rep.rederived == 10
    assert verify_dir(out).ok
    assert main(["verify", plan_path, "--rederive", "2"]) == 0

    victim = next(f for f in plan.files if f.tensors)
    from streamconv.execute.formats import layout_of

    start, end = layout_of(victim).spans[3]
    path = os.path.join(out, *victim.path.split("/"))
    with open(path, "r+b") as f:
        f.seek(start + 1)
        byte = f.read(1)
        f.seek(start + 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    rep = verify_plan(plan)
    assert len(rep.problems) == 1 and victim.tensors[3].name in rep.problems[0] and "checksum" in rep.problems[0]
    assert not verify_dir(out).ok
    capsys.readouterr()
    assert main(["verify", plan_path]) == 1
    assert "FAIL" in capsys.readouterr().out

    os.remove(os.path.join(out, "latest_checkpointed_iteration.txt"))
    rep = verify_plan(plan, sample=9)
    assert any("latest_checkpointed_iteration.txt: missing" in p for p in rep.problems)


def test_rederive_catches_wrong_bytes_with_matching_checksums(tiny_hf, tmp_path):
    """A file rewritten consistently (checksums journaled for the wrong bytes) is caught by re-derivation."""
    out = str(tmp_path / "mcore")
    plan = make_plan(tiny_hf["bf16"], out)
    run_plan(plan)
    f = next(f for f in plan.files if f.tensors)
    from streamconv.execute.formats import layout_of

    spans = layout_of(f).spans
    path = os.path.join(out, *f.path.split("/"))
    with open(path, "r+b") as fh:
        for start, end in spans:
            fh.seek(start)
            fh.write(b"\0" * (end - start))
    with open(journal.path_of(out), "a") as j:  # a lying journal entry for the zeroed file
        import json
        import zlib
        j.write(json.dumps({"kind": "file", "path": f.path, "size": os.path.getsize(path),
                            "crc32": [zlib.crc32(b"\0" * (e - s)) for s, e in spans]}) + "\n")
    rep = verify_plan(plan, rederive=plan.tensor_count)
    assert any("re-derived from the source" in p for p in rep.problems)


def test_output_of_another_plan_is_not_resumed(tiny_hf, tmp_path):
    out = str(tmp_path / "mcore")
    run_plan(make_plan(tiny_hf["bf16"], out))
    other = plan_hf_to_mcore(tiny_hf["bf16"], out, ParallelSizes(1, 1, 2), McoreOptions())
    with pytest.raises(ValidationError, match="holds the output of a different plan"):
        run_plan(other)
    run_plan(other, RunOptions(overwrite=True))
    assert verify_plan(other).ok
