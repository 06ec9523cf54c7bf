"""One writer per save dir: a second run fails at once naming the holder, a killed holder's lock is taken
over, and the output is always the one an uninterrupted run writes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from streamconv.execute.executor import RunOptions, run_plan
from streamconv.execute.verify import verify_plan
from streamconv.plan.plan import Plan

from .conftest import one_error

# A run of the plan whose writes are slowed down (each piece sleeps first), so that it holds the lock for a while.
SLOW_RUN = """
import sys, time
from streamconv.storage.registry import get_format
from streamconv.plan.plan import Plan
from streamconv.execute.executor import RunOptions, run_plan
fmt = get_format("megatron_pt")
write = fmt.write_piece
def slow(*a, **k):
    time.sleep(0.03)
    return write(*a, **k)
fmt.write_piece = slow
run_plan(Plan.load(sys.argv[1]), RunOptions(band_bytes=1 << 16, max_memory=8 << 20, num_workers=1))
"""


def digests(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if not n.startswith(".streamconv"):
                p = os.path.join(d, n)
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def clean(world, tmp_path_factory):
    """The bytes an uninterrupted run writes."""
    plan = Plan.load(world["plan"])
    out = str(tmp_path_factory.mktemp("clean") / "out")
    run_plan(Plan(**{**plan.__dict__, "target_root": out}), RunOptions(band_bytes=8192, max_memory=8 << 20))
    return digests(out)


def start_slow(plan_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    return subprocess.Popen([sys.executable, "-c", SLOW_RUN, plan_path], env=env, stderr=subprocess.PIPE, text=True)


def journaled(root):
    try:
        return sum(1 for line in open(os.path.join(root, ".streamconv_journal.jsonl")) if '"kind":"file"' in line)
    except FileNotFoundError:
        return 0


def wait_for(cond, timeout=60):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def with_target(world, tmp_path):
    obj = json.load(open(world["plan"]))
    obj["target"]["root"] = str(tmp_path / "out")
    path = str(tmp_path / "plan.json")
    json.dump(obj, open(path, "w"))
    return path, str(tmp_path / "out")


def test_a_second_run_fails_at_once_naming_the_holder(world, tmp_path, cli, clean):
    """Second runs started at three points of the holder's run (lock just taken, one file done, most files
    done) each fail at once naming the holder's pid; the holder's output equals an uninterrupted run's."""
    plan, out = with_target(world, tmp_path)
    holder = start_slow(plan)
    lock = os.path.join(out, ".streamconv.lock")
    tried = 0
    try:
        def holds():  # the holder writes its pid once it holds the lock (the file alone may precede the flock)
            try:
                return open(lock).read().strip() == str(holder.pid)
            except FileNotFoundError:
                return False

        for reached in (holds, lambda: journaled(out) >= 1, lambda: journaled(out) >= 3):
            wait_for(reached)
            start = time.monotonic()
            code, err = cli("run", plan, "--no-progress")
            assert time.monotonic() - start < 5, "the second run must fail at once"
            if holder.poll() is not None and code == 0:
                break  # the holder finished meanwhile: the second run found the output complete
            one_error(code, err, f"another streamconv run (pid {holder.pid})", "Wait for it")
            tried += 1
    finally:
        assert holder.wait(timeout=120) == 0, holder.stderr.read()
    assert tried >= 2
    assert digests(out) == clean
    assert verify_plan(Plan.load(plan)).ok


def test_a_killed_holders_lock_is_taken_over(world, tmp_path, cli, clean, caplog):
    plan, out = with_target(world, tmp_path)
    holder = start_slow(plan)
    wait_for(lambda: journaled(out) >= 1)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(os.path.join(out, ".streamconv.lock"))  # the dead holder's file stays, unlocked
    code, err = cli("run", plan, "--no-progress")
    assert code == 0, err
    assert not os.path.exists(os.path.join(out, ".streamconv.lock"))
    assert digests(out) == clean
    assert verify_plan(Plan.load(plan)).ok


def test_a_lock_file_that_is_a_symlink_is_refused(world, tmp_path, cli):
    plan, out = with_target(world, tmp_path)
    os.makedirs(out)
    os.symlink("/dev/null", os.path.join(out, ".streamconv.lock"))
    one_error(*cli("run", plan, "--no-progress"), "cannot open the run lock (it is a symlink)")
    assert sorted(os.listdir(out)) == [".streamconv.lock"]
