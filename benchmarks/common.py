"""Shared pieces of the benchmarks: child processes with peak RSS, cache dropping, the raw-copy baseline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

MiB = 1 << 20


def files_under(root: str, suffix: str) -> list[str]:
    """Every file below ``root`` whose name ends with ``suffix`` (``".pt"``: an mcore checkpoint's rank files)."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(suffix))


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache (needs root); returns whether it worked.

    Python, torch and dask are then imported once, so that a cold run reads the data cold but not the
    ~0.2 GB of libraries (which would otherwise count as read amplification)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    subprocess.run([sys.executable, "-c", "import torch, dask, numpy, safetensors, streamconv.cli.main, "
                    "streamconv.execute.executor"], check=True)
    return True


def run_measured(cmd: list[str], *, env: dict | None = None) -> dict:
    """Run ``cmd`` as a child; wall seconds and peak RSS as the OS reports it (``/usr/bin/time -v``, or
    getrusage of the children where that tool is absent)."""
    full_env = dict(os.environ, **(env or {}))
    start = time.monotonic()
    if os.path.exists("/usr/bin/time"):
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=full_env)
        wall = time.monotonic() - start
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        rss = int(m.group(1)) * 1024 if m else None
        fs_in = re.search(r"File system inputs: (\d+)", proc.stderr)
        fs_out = re.search(r"File system outputs: (\d+)", proc.stderr)
        io = {"disk_read_bytes": int(fs_in.group(1)) * 512 if fs_in else None,
              "disk_write_bytes": int(fs_out.group(1)) * 512 if fs_out else None}
        cpu = [re.search(rf"{what} time \(seconds\): ([0-9.]+)", proc.stderr) for what in ("User", "System")]
        io["cpu_seconds"] = sum(float(m.group(1)) for m in cpu) if all(cpu) else None
    else:
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss = after * 1024 if after > before else None  # an upper bound across children
        io = {"disk_read_bytes": None, "disk_write_bytes": None, "cpu_seconds": None}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"seconds": wall, "peak_rss_bytes": rss, **io, "stdout": proc.stdout[-2000:]}


def raw_copy_script(inputs: list[str], out_path: str, out_bytes: int) -> list[str]:
    """A child command that reads every input file and writes ``out_bytes`` with plain 64 MiB read/write and
    fsync: the physical floor of a conversion (read the input once, write the output once)."""
    code = f"""
import os
buf = bytearray({64 * MiB})
mv = memoryview(buf)
for p in {inputs!r}:
    with open(p, 'rb', buffering=0) as f:
        while f.readinto(buf):
            pass
left = {out_bytes}
with open({out_path!r}, 'wb', buffering=0) as f:
    while left > 0:
        n = f.write(mv[:min(left, len(buf))])
        left -= n
    os.fsync(f.fileno())
os.remove({out_path!r})
"""
    return [sys.executable, "-c", code]


def dir_bytes(path: str) -> int:
    """Bytes of the checkpoint files under ``path`` (the run journal excluded: its timestamps vary)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not f.startswith(".streamconv"))


def save_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
