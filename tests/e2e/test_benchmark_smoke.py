"""A smoke run of the benchmark harness on tiny checkpoints: every scenario runs and reports its figures
(the real benchmark is `make bench`, too slow for CI)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /usr/bin/time or getrusage")
def test_harness_smoke(tmp_path, monkeypatch):
    from benchmarks import common, harness

    monkeypatch.chdir(ROOT)  # the children run `python -m streamconv` / `-m benchmarks.naive` from here
    monkeypatch.setattr(common, "drop_caches", lambda: False)  # do not flush the machine's cache in CI
    monkeypatch.setattr(harness, "drop_caches", lambda: False)
    assert harness.main(["--smoke", "--work-dir", str(tmp_path)]) == 0
    with open(tmp_path / "results.json") as f:
        results = json.load(f)["results"]
    assert [r["scenario"] for r in results] == [s.name for s in harness.SCENARIOS]
    for r in results:
        assert r["output_bytes"] > r["input_bytes"] > 0
        assert r["convert"]["seconds"] > 0 and r["raw_copy"]["seconds"] > 0
        assert r["convert"]["peak_rss_bytes"] and r["convert"]["peak_rss_bytes"] > 50 * 2**20
    by_name = {r["scenario"]: r for r in results}
    # same plan, different worker count: the same files to the byte count
    assert by_name["fp8"]["output_bytes"] == by_name["fp8-1worker"]["output_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /usr/bin/time or getrusage")
def test_mcore2hf_benchmark_smoke(tmp_path, monkeypatch):
    """streamconv (with and without replica checks) and the whole-stage baseline write the same bytes."""
    from benchmarks import common
    from benchmarks import mcore2hf as bench

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(common, "drop_caches", lambda: False)
    monkeypatch.setattr(bench, "drop_caches", lambda: False)
    assert bench.main(["--smoke", "--work-dir", str(tmp_path)]) == 0
    with open(tmp_path / "mcore2hf-smoke.json") as f:
        runs = json.load(f)["runs"]
    assert set(runs) == {"streamconv", "streamconv+verify", "naive"}
    assert runs["streamconv"]["output_bytes"] == runs["streamconv+verify"]["output_bytes"]
    # the baseline's save_file orders and pads headers its own way: the same tensors, a few header bytes apart
    assert abs(runs["naive"]["output_bytes"] - runs["streamconv"]["output_bytes"]) < 64 * 10
    assert all(r["seconds"] > 0 and r["peak_rss_bytes"] for r in runs.values())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /usr/bin/time or getrusage")
def test_lora_benchmark_smoke(tmp_path, monkeypatch):
    """The LoRA benchmark's three runs (merge, plain, adapter export) report their figures."""
    from benchmarks import common
    from benchmarks import lora as bench

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(common, "drop_caches", lambda: False)
    monkeypatch.setattr(bench, "drop_caches", lambda: False)
    assert bench.main(["--smoke", "--work-dir", str(tmp_path), "--rank", "8"]) == 0
    with open(tmp_path / "lora-smoke.json") as f:
        res = json.load(f)
    assert set(res["runs"]) == {"merge", "plain", "export"}
    assert res["runs"]["merge"]["output_bytes"] == res["runs"]["plain"]["output_bytes"] > 0
    assert 0 < res["runs"]["export"]["output_bytes"] < res["adapter_bytes"]
    assert all(r["seconds"] > 0 and r["peak_rss_bytes"] for r in res["runs"].values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/io and /usr/bin/time")
def test_cluster_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/cluster.py on the tiny checkpoint: every scenario runs and reports its figures."""
    from benchmarks import cluster as bench

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(bench, "drop_caches", lambda: False)
    assert bench.main(["--smoke", "--work-dir", str(tmp_path)]) == 0
    with open(tmp_path / "results.json") as f:
        r = json.load(f)
    assert r["raw_copy"]["seconds"] > 0 and r["single_process"]["seconds"] > 0
    assert [c["workers"] for c in r["cluster"]] == [1, 2]
    for c in r["cluster"]:
        assert len(c["rchar_per_worker"]) == c["workers"] and all(b > 0 for b in c["rchar_per_worker"])
        assert all(0 < b < 2 * 2**30 for b in c["worker_peak_rss_bytes"])
    assert len(r["split"]["parts"]) == 2 and r["rates"]["cpu_seconds_per_gb_written"] > 0


def test_reshard_and_zarr_benchmarks_smoke(tmp_path, monkeypatch):
    """mcore2mcore (one pass = two passes, byte for byte) and the zarr scenarios run and report their figures."""
    from benchmarks import common
    from benchmarks import mcore2mcore, zarr_store

    monkeypatch.chdir(ROOT)
    for mod in (common, mcore2mcore, zarr_store):
        monkeypatch.setattr(mod, "drop_caches", lambda: False)
    assert mcore2mcore.main(["--smoke", "--work-dir", str(tmp_path)]) == 0
    with open(tmp_path / "mcore2mcore-smoke.json") as f:
        m2m = json.load(f)
    assert m2m["byte_identical_to_two_passes"] is True
    assert set(m2m["runs"]) == {"mcore2mcore", "mcore2mcore+verify", "mcore2hf+hf2mcore"}
    assert all(r["seconds"] > 0 and r["peak_rss_bytes"] for r in m2m["runs"].values())
    assert zarr_store.main(["--smoke", "--work-dir", str(tmp_path), "--compressors", "none,zstd"]) == 0
    with open(tmp_path / "zarr-smoke-fp8.json") as f:
        runs = json.load(f)["runs"]
    assert runs["zarr[none]->mcore"]["same_size_as_from_safetensors"]
    assert runs["zarr[zstd]->mcore"]["same_size_as_from_safetensors"]
    assert runs["hf->zarr[zstd]"]["store_bytes"] < runs["hf->zarr[none]"]["store_bytes"]
