"""FP8 e4m3fn -> bf16 block dequant (128x128 float32 scales) on one DeepSeek-V3-shaped weight: the plain torch
formula measured in the same run, the numpy lookup-table gather, the numba gather on one thread, and two
threads dequantizing two matrices at once (the executor's situation: the kernel must run without the GIL).

    python -m benchmarks.dequant [--rows 7168 --cols 18432] [--repeat 5]

Every result is checked bit for bit against the torch formula.  Writes ``bench-out/dequant.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from streamconv.execute import dequant

from .common import save_json


def best_of(n: int, fn) -> tuple[float, object]:
    """Best wall time of ``n`` calls, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(n):
        out = None  # free the previous output first: it is the largest allocation
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def make(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight like a real one (randn cast to fp8, subnormals included) and scale_inv-like scales."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.5).to(torch.float8_e4m3fn)
    s = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 1e-3 + 1e-5
    return w, s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=7168)
    ap.add_argument("--cols", type=int, default=18432)
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs per formulation")
    ap.add_argument("--out", default=os.path.join("bench-out", "dequant.json"))
    args = ap.parse_args(argv)

    w, s = make(args.rows, args.cols, 0)
    w2, s2 = make(args.rows, args.cols, 1)
    n = w.numel()
    kw = {"block": (128, 128), "origin": (0, 0), "dtype": torch.bfloat16}
    if dequant.have_numba():
        dequant._dequant_numba(w[:256, :256], s, **kw)  # compile (or load the cache) outside the timings

    t_torch, ref = best_of(args.repeat, lambda: dequant.dequant_reference(w, s, block=(128, 128)))
    ref2 = dequant.dequant_reference(w2, s2, block=(128, 128))
    runs = {"torch_formula": (t_torch, n, True)}

    def both(fn):
        """Two threads, two matrices, at once."""
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(fn, w, s, **kw), pool.submit(fn, w2, s2, **kw)
            return a.result(), b.result()

    paths = [("numpy_lut", dequant._dequant_numpy)]
    if dequant.have_numba():
        paths.append(("numba", dequant._dequant_numba))
    for name, fn in paths:
        t1, out = best_of(args.repeat, lambda: fn(w, s, **kw))
        runs[f"{name}_1thread"] = (t1, n, same_bits(out, ref))
        out = None
        t2, (a, b) = best_of(args.repeat, lambda: both(fn))
        runs[f"{name}_2threads"] = (t2, 2 * n, same_bits(a, ref) and same_bits(b, ref2))

    results = {}
    print(f"FP8 e4m3fn -> bf16, {args.rows}x{args.cols}, 128x128 blocks, best of {args.repeat}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    for name, (seconds, elems, exact) in runs.items():
        rate = elems / seconds / 1e9
        results[name] = {"seconds": seconds, "elements": elems, "gelem_per_s": rate,
                         "vs_torch": rate / (n / t_torch / 1e9), "bit_exact": exact}
        print(f"  {name:18s} {seconds * 1e3:8.1f} ms  {rate:6.3f} Gelem/s  {results[name]['vs_torch']:6.2f}x torch"
              f"  {'bit-exact' if exact else 'MISMATCH'}")
    if dequant.have_numba():
        scaling = results["numba_2threads"]["gelem_per_s"] / results["numba_1thread"]["gelem_per_s"]
        print(f"  numba 2 threads / 1 thread: {scaling:.2f}x throughput")
    save_json(args.out, {"scenario": "dequant_fp8_block e4m3fn -> bf16", "shape": [args.rows, args.cols],
                         "block": [128, 128], "repeat": args.repeat, "torch_threads": torch.get_num_threads(),
                         "cpu_count": os.cpu_count(), "have_numba": dequant.have_numba(), "results": results})
    return 0 if all(r["bit_exact"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
