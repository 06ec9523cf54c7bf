"""A real dask.distributed cluster for the tests: ``dask scheduler`` and ``dask worker`` processes started from
the command line (as a user would), on free ports, each worker optionally in its own network namespace.

    with Cluster(tmp_path, workers=2) as c:
        main(["run", plan, "--scheduler", c.address])
        c.kill_worker(0)            # SIGKILL the worker process (its nanny starts a new one)
        c.read_bytes()              # rchar of every worker process tree, summed

Network namespaces (``netns=True``): each worker runs under ``ip netns exec`` in a namespace of its own, joined
to the root namespace (where the scheduler and the client are) by a veth pair with addresses assigned here,
so all traffic between a worker and the scheduler crosses a (virtual) network.  :func:`netns_unavailable`
says why that cannot be done on this machine, if it cannot.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASK = os.path.join(os.path.dirname(sys.executable), "dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def netns_unavailable() -> str | None:
    """Why worker network namespaces cannot be made here (None: they can)."""
    if not os.path.exists("/usr/sbin/ip") and not os.path.exists("/sbin/ip") and not os.path.exists("/bin/ip"):
        return "no `ip` command (apt-get install -y iproute2)"
    name = f"scprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip() or r.returncode} (needs root / CAP_SYS_ADMIN)"
    r = subprocess.run(["ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b"],
                       capture_output=True, text=True)
    subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if r.returncode != 0:
        return f"cannot create a veth pair: {r.stderr.strip()}"
    return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def process_tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io as a dict (rchar, read_bytes, ...); {} for a process that is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
    except (FileNotFoundError, ProcessLookupError):
        return {}


class Cluster:
    """``dask scheduler`` + ``workers`` x ``dask worker --nworkers 1 --nthreads 1`` (with its nanny, as by
    default), logs in ``tmp``."""

    def __init__(self, tmp, workers: int = 2, *, netns: bool = False, nanny: bool = True):
        self.tmp = str(tmp)
        os.makedirs(self.tmp, exist_ok=True)
        self.n = workers
        self.netns = netns
        self.nanny = nanny
        self.port = free_port()
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * workers
        self.namespaces: list[str] = []
        self.tag = f"sc{os.getpid() % 10000}"

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            if self.netns:
                self._make_namespaces()
            self.start_scheduler()
            for i in range(self.n):
                self.start_worker(i)
            self.wait_for_workers(self.n)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, name: str):
        return open(os.path.join(self.tmp, f"{name}.log"), "ab")

    def start_scheduler(self) -> None:
        host = "0.0.0.0" if self.netns else "127.0.0.1"
        self.scheduler = subprocess.Popen(
            [DASK, "scheduler", "--host", host, "--port", str(self.port), "--no-dashboard"],
            stdout=self._log("scheduler"), stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited {self.scheduler.returncode}; see {self.tmp}/scheduler.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("dask scheduler did not start in 60 s")

    def start_worker(self, i: int) -> None:
        cmd = [DASK, "worker", f"tcp://{self._scheduler_host(i)}:{self.port}", "--nworkers", "1", "--nthreads", "1",
               "--no-dashboard", "--name", f"w{i}", "--memory-limit", "0",
               "--local-directory", os.path.join(self.tmp, f"w{i}")]
        if not self.nanny:
            cmd.append("--no-nanny")
        if self.netns:
            cmd = ["ip", "netns", "exec", self.namespaces[i], *cmd, "--host", self._worker_host(i)]
        self.workers[i] = subprocess.Popen(cmd, stdout=self._log(f"w{i}"), stderr=subprocess.STDOUT, env=_env(),
                                           start_new_session=True)

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        """{worker address: pid} of the worker processes the scheduler knows (not their nannies)."""
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            return client.run(os.getpid)

    def kill_worker(self, i: int) -> int:
        """SIGKILL the worker process of launcher ``i`` (its nanny, if any, starts a new one). Returns its pid."""
        launcher = self.workers[i]
        tree = process_tree(launcher.pid)
        # with a nanny, the worker is the nanny's child started by multiprocessing's spawn; without, the launcher
        victims = [p for p in tree if p != launcher.pid and _is_spawned(p)] or [launcher.pid]
        pid = victims[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            os.killpg(self.scheduler.pid, signal.SIGKILL)
            self.scheduler.wait()

    def read_bytes(self, field: str = "rchar") -> int:
        """``field`` of /proc/PID/io summed over every process of every worker launcher's tree."""
        return sum(self.read_bytes_by_worker(field))

    def read_bytes_by_worker(self, field: str = "rchar") -> list[int]:
        return [sum(io_counters(p).get(field, 0) for p in process_tree(w.pid)) if w else 0 for w in self.workers]

    def restart(self) -> None:
        """Every process stopped, then a new scheduler on the same address and new workers."""
        self._stop()
        self.start_scheduler()
        for i in range(self.n):
            self.start_worker(i)
        self.wait_for_workers(self.n)

    def _stop(self) -> None:
        for w in self.workers:
            if w is not None and w.poll() is None:
                try:
                    os.killpg(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                w.wait()
        self.kill_scheduler()

    def close(self) -> None:
        self._stop()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True)
        self.namespaces = []

    # --- network namespaces ----------------------------------------------------------------------------------
    def _subnet(self, i: int) -> str:
        return f"10.{200 + (os.getpid() % 50)}.{i}"

    def _scheduler_host(self, i: int) -> str:
        return f"{self._subnet(i)}.1" if self.netns else "127.0.0.1"

    def _worker_host(self, i: int) -> str:
        return f"{self._subnet(i)}.2"

    def _make_namespaces(self) -> None:
        for i in range(self.n):
            ns = f"{self.tag}w{i}"
            host_if, ns_if = f"{ns}h", f"{ns}n"
            self.namespaces.append(ns)
            for cmd in (["ip", "netns", "add", ns],
                        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
                        ["ip", "link", "set", ns_if, "netns", ns],
                        ["ip", "addr", "add", f"{self._scheduler_host(i)}/24", "dev", host_if],
                        ["ip", "link", "set", host_if, "up"],
                        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{self._worker_host(i)}/24", "dev", ns_if],
                        ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
                        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True, capture_output=True)


def _is_spawned(pid: int) -> bool:
    """A process started by multiprocessing's spawn (the nanny's worker; not its resource tracker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    except FileNotFoundError:
        return False
