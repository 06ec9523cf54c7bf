"""A real dask.distributed cluster: ``dask scheduler`` and two ``dask worker --nworkers 1 --nthreads 1`` processes
started from the command line (tests/e2e/cluster.py), the client being ``streamconv run PLAN --scheduler ADDRESS``.

Every cluster output is compared byte for byte with the single-process (threaded) run of the same conversion.
Bytes read are counted from ``/proc/PID/io`` of every worker process: ``rchar`` (every byte the process passed
to read/pread, from the page cache or not), not ``read_bytes`` (only what the block device delivered): the
sources were just written by the generator and sit in the page cache, so ``read_bytes`` stays near 0 however
often a worker re-reads them, while ``rchar`` counts each request, which is what "read once" is about.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from streamconv import synth
from streamconv.cli.main import main
from streamconv.errors import StreamconvError
from streamconv.execute import journal
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.plan import Plan
from streamconv.plan.planner import plan_hf_to_mcore
from streamconv.plan.zarr_plans import plan_hf_to_zarr
from tests.e2e.cluster import DASK, ROOT, Cluster, netns_unavailable

pytestmark = pytest.mark.skipif(not os.path.exists(DASK), reason=f"no dask command at {DASK}")

SIZES = ParallelSizes(2, 1, 2)   # TP 2 EP 2, as in the report
OPTIONS = McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1)
# Shaped like 671B: routed experts hold most bytes, attention and embeddings a few percent (~22 MB, FP8).
MOE_HEAVY = dict(hidden_size=256, moe_intermediate_size=256, n_routed_experts=32, vocab_size=1024,
                 intermediate_size=512, num_hidden_layers=3)
RUN = RunOptions(max_memory=64 << 20)
TOKEN = re.compile(r"\.[0-9a-f]{32}(\.partial)?$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Sources and single-process references: {"hf", "mcore" (its hf2mcore output), "hf_back" (mcore2hf of it)}."""
    root = tmp_path_factory.mktemp("cluster_world")
    hf = str(root / "hf")
    synth.synth_checkpoint(hf, dataclasses.replace(synth.TINY, fp8=True, max_shard_bytes=2 << 20, **MOE_HEAVY))
    mcore = str(root / "mcore")
    run_plan(plan_hf_to_mcore(hf, mcore, SIZES, OPTIONS), RUN)
    hf_back = str(root / "hf_back")
    run_plan(plan_mcore_to_hf(mcore, hf_back, SIZES, OPTIONS), RUN)
    return {"root": root, "hf": hf, "mcore": mcore, "hf_back": hf_back}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("cluster_logs"), workers=2) as c:
        yield c


def hf2mcore_plan(world, out: str) -> str:
    path = out + ".plan.json"
    plan_hf_to_mcore(world["hf"], out, SIZES, OPTIONS).save(path)
    return path


def mcore2hf_plan(world, out: str) -> str:
    path = out + ".plan.json"
    plan_mcore_to_hf(world["mcore"], out, SIZES, OPTIONS).save(path)
    return path


def tree(root: str) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, but the run's bookkeeping (journal, lock)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if not f.startswith(".streamconv"):
                p = os.path.join(d, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = fh.read()
    return out


def assert_same_tree(got: str, want: str) -> None:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for rel in b:
        assert a[rel] == b[rel], rel


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


class Background:
    """``streamconv ARGV`` in a thread of this process (the client), so the test can act while it runs."""

    def __init__(self, argv: list[str]):
        self.rc, self.err = None, ""
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv):
        try:
            self.rc, self.err = cli(argv)
        except BaseException as exc:  # noqa: BLE001
            self.rc, self.err = -1, repr(exc)

    def running(self) -> bool:
        return self.thread.is_alive()

    def wait(self, timeout: float = 240) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not finish"
        return self.rc


def journaled(out: str) -> int:
    return len(journal.read(out)[1]) if os.path.exists(journal.path_of(out)) else 0


def attempt_files(out: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if TOKEN.search(f)]


# When to strike, as seen from the save dir: tasks just submitted; a worker mid-file; a group's files finished
# on a worker and not yet renamed by the client, or one file journaled.
POINTS = {
    "submitted": lambda out: os.path.exists(journal.path_of(out)),
    "writing": lambda out: any(p.endswith(".partial") for p in attempt_files(out)),
    "finished": lambda out: journaled(out) > 0 or any(not p.endswith(".partial") for p in attempt_files(out)),
}


def wait_for(cond, run: Background, timeout: float = 120) -> bool:
    """Poll ``cond`` while ``run`` runs; True when it held before the run ended."""
    deadline = time.time() + timeout
    while run.running() and time.time() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return False


# --- tests ------------------------------------------------------------------------------------------------------

def test_hf2mcore_on_a_cluster_is_byte_identical_and_reads_each_byte_once(world, cluster, tiny_hf, tmp_path):
    # Warm up the workers (imports) with a small conversion, which must match too (TP 2 PP 2 EP 2).
    small = str(tmp_path / "small")
    plan = plan_hf_to_mcore(tiny_hf["fp8"], small, ParallelSizes(2, 2, 2), OPTIONS)
    plan.save(small + ".json")
    assert cli(["run", small + ".json", "--scheduler", cluster.address, "--no-progress"])[0] == 0
    run_plan(plan_hf_to_mcore(tiny_hf["fp8"], str(tmp_path / "small_ref"), ParallelSizes(2, 2, 2), OPTIONS), RUN)
    assert_same_tree(small, str(tmp_path / "small_ref"))

    out = str(tmp_path / "mcore")
    read, source = run_counting_reads(cluster, hf2mcore_plan(world, out))
    assert_same_tree(out, world["mcore"])
    print(f"workers asked for {sum(read) / source:.3f}x the source's bytes ({read})")
    assert sum(read) <= 1.2 * source, (read, source)
    assert all(r > 0.2 * source for r in read), read   # both workers took part


def run_counting_reads(cluster, path: str) -> tuple[list[int], int]:
    """Run the saved plan ``path`` on the cluster: (bytes each worker process read meanwhile, the plan's source
    bytes)."""
    before = cluster.read_bytes_by_worker()
    rc, err = cli(["run", path, "--scheduler", cluster.address, "--no-progress"])
    read = [a - b for a, b in zip(cluster.read_bytes_by_worker(), before)]
    assert rc == 0, err
    return read, sum(s.size for s in Plan.load(path).source_files)


def test_mcore2hf_on_a_cluster_is_byte_identical(world, cluster, tmp_path):
    out = str(tmp_path / "hf")
    rc, err = cli(["run", mcore2hf_plan(world, out), "--scheduler", cluster.address, "--no-progress"])
    assert rc == 0, err
    assert_same_tree(out, world["hf_back"])


def test_hf2mcore_from_a_zarr_store_on_a_cluster(world, cluster, tmp_path):
    """Workers read a store's chunks from the shared filesystem as they read safetensors: the same rank files
    as the single-process run from the HF directory, each stored byte asked for about once."""
    store = str(tmp_path / "store")
    run_plan(plan_hf_to_zarr(world["hf"], store), RUN)
    warm = str(tmp_path / "warm")   # a first run loads the workers' imports (read from disk too), untimed
    plan_hf_to_mcore(store, warm, SIZES, OPTIONS).save(warm + ".plan.json")
    assert cli(["run", warm + ".plan.json", "--scheduler", cluster.address, "--no-progress"])[0] == 0
    out = str(tmp_path / "mcore")
    plan_hf_to_mcore(store, out, SIZES, OPTIONS).save(out + ".plan.json")
    read, source = run_counting_reads(cluster, out + ".plan.json")
    assert_same_tree(out, world["mcore"])
    print(f"workers asked for {sum(read) / source:.3f}x the store's bytes ({read})")
    assert sum(read) <= 1.2 * source, (read, source)


def kill_worker_during_run(world, cluster, tmp_path, point: str, direction: str = "hf2mcore") -> None:
    out = str(tmp_path / f"out-{point}")
    path = (hf2mcore_plan if direction == "hf2mcore" else mcore2hf_plan)(world, out)
    total = len(Plan.load(path).files)
    # Small waves: more, smaller pieces, so a run lasts long enough to be caught in the middle of a file.
    run = Background(["run", path, "--scheduler", cluster.address, "--no-progress", "--max-memory", "8MiB"])
    hit = wait_for(lambda: POINTS[point](out), run)
    done_at_kill = journaled(out)
    victim = cluster.kill_worker(0)
    assert run.wait() == 0, run.err
    assert hit and done_at_kill < total, "the worker was killed after the run had finished: the test proves nothing"
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    assert attempt_files(out) == []
    assert_same_tree(out, world["mcore" if direction == "hf2mcore" else "hf_back"])
    cluster.wait_for_workers(2)   # the nanny has started a new worker process


def test_worker_killed_mid_file_output_identical(world, cluster, tmp_path):
    kill_worker_during_run(world, cluster, tmp_path, "writing")


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(5))
@pytest.mark.parametrize("direction", ["hf2mcore", "mcore2hf"])
@pytest.mark.parametrize("point", sorted(POINTS))
def test_worker_killed_at_every_point_repeatedly(world, cluster, tmp_path, point, direction, repeat):
    kill_worker_during_run(world, cluster, tmp_path, point, direction)


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(3))
def test_worker_killed_without_nanny_survivor_finishes(world, tmp_path, repeat):
    """No nanny: the killed worker stays dead and the other one does all the remaining work."""
    with Cluster(tmp_path / "logs", workers=2, nanny=False) as c:
        out = str(tmp_path / "out")
        path = hf2mcore_plan(world, out)
        run = Background(["run", path, "--scheduler", c.address, "--no-progress", "--max-memory", "8MiB"])
        assert wait_for(lambda: POINTS["writing"](out), run)
        c.kill_worker(0)
        assert run.wait() == 0, run.err
        assert_same_tree(out, world["mcore"])


def test_bad_input_fails_the_run_once(world, cluster, tiny_hf, tmp_path):
    """A source truncated after the plan was audited: the tasks fail on it, the run fails at once with the
    file named, each task ran once (no retries), nothing is left half-written, the workers live on."""
    hf = str(tmp_path / "hf")
    shutil.copytree(tiny_hf["fp8"], hf)
    out = str(tmp_path / "out")
    plan = plan_hf_to_mcore(hf, out, SIZES, OPTIONS)
    shards = sorted(os.path.join(hf, n) for n in os.listdir(hf) if n.endswith(".safetensors"))
    logs = {p: os.path.getsize(p) for p in (os.path.join(cluster.tmp, f"w{i}.log") for i in range(2))}

    def truncate():   # called once every check passed, before the first write
        for p in shards:
            os.truncate(p, 1000)

    start = time.time()
    with pytest.raises(StreamconvError, match=r"truncated|ends at byte"):
        run_plan(plan, RunOptions(scheduler=cluster.address, progress=False), accepted=truncate)
    assert time.time() - start < 60
    assert [f for f in tree(out) if not f.endswith(".json")] == []   # no rank file, no attempt file
    failed = []
    for p, size in logs.items():
        with open(p, "rb") as f:
            f.seek(size)
            failed += re.findall(rb"Compute Failed\s+Key:\s+(\S+)", f.read())
    assert failed and len(failed) == len(set(failed)), failed   # each failing task ran once
    cluster.wait_for_workers(2, timeout=5)


def test_scheduler_killed_then_the_same_command_resumes(world, cluster, tmp_path):
    out = str(tmp_path / "mcore")
    path = hf2mcore_plan(world, out)
    argv = ["run", path, "--scheduler", cluster.address, "--no-progress", "--max-memory", "8MiB"]
    run = Background(argv)
    assert wait_for(lambda: journaled(out) > 0, run), "the run ended before a file was journaled"
    cluster.kill_scheduler()
    assert run.wait() == 2
    assert "lost the scheduler" in run.err and run.err.count("\n") == 1, run.err
    kept = {rel: os.stat(os.path.join(out, rel)).st_ino for rel in journal.read(out)[1]}
    assert kept
    cluster.restart()
    rc, err = cli(argv)
    assert rc == 0, err
    assert_same_tree(out, world["mcore"])
    # resumed, not redone: files journaled before the loss are the same inodes
    assert all(os.stat(os.path.join(out, rel)).st_ino == ino for rel, ino in kept.items())
    assert attempt_files(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["writing", "finished"])
def test_client_killed_then_the_same_command_resumes(world, cluster, tmp_path, point):
    """The client (``streamconv run``, which renames and journals) SIGKILLed mid-run: tasks still running on
    the workers finish into attempt files nobody renames; the same command resumes to identical output."""
    out = str(tmp_path / "mcore")
    path = hf2mcore_plan(world, out)
    argv = ["run", path, "--scheduler", cluster.address, "--no-progress", "--max-memory", "8MiB"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not POINTS[point](out):
        time.sleep(0.002)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the client finished before it could be killed"
    rc, err = cli(argv)
    assert rc == 0, err
    assert_same_tree(out, world["mcore"])
    assert attempt_files(out) == []
    cluster.wait_for_workers(2)


@pytest.mark.slow
def test_workers_in_their_own_network_namespaces(world, tmp_path):
    """Each worker in a network namespace of its own, reaching the scheduler over a veth pair: separate
    'hosts' on one machine, sharing only the filesystem."""
    why = netns_unavailable()
    if why:
        print(f"skipping: network namespaces cannot be made here: {why}")
        pytest.skip(why)
    with Cluster(tmp_path / "logs", workers=2, netns=True) as c:
        for direction, plan_of, want in (("hf2mcore", hf2mcore_plan, "mcore"), ("mcore2hf", mcore2hf_plan, "hf_back")):
            out = str(tmp_path / direction)
            path = plan_of(world, out)
            before = c.read_bytes_by_worker()
            rc, err = cli(["run", path, "--scheduler", c.address, "--no-progress"])
            read = [a - b for a, b in zip(c.read_bytes_by_worker(), before)]
            assert rc == 0, err
            assert_same_tree(out, world[want])
            assert all(r > 0 for r in read), read
        addresses = list(c.worker_pids())
        assert sorted(a.split("//")[1].rsplit(":", 1)[0] for a in addresses) == sorted(
            c._worker_host(i) for i in range(2))
