"""A smoke run of the dataset benchmark on a tiny corpus: every case runs, outputs are identical, figures are
reported (the real run is `python -m benchmarks.data`)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /usr/bin/time or getrusage")
def test_data_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks import data

    monkeypatch.chdir(ROOT)  # the children run `python -m streamconv` / `-m benchmarks.data_naive` from here
    assert data.main(["--smoke", "--sizes", "1MB", "--work-dir", str(tmp_path)]) == 0
    with open(tmp_path / "data_results.json") as f:
        (result,) = json.load(f)["results"]
    assert result["identical_outputs"]
    assert [(c["kind"], c["workers"]) for c in result["cases"]] == [
        ("baseline", 1), ("streamconv", 1), ("baseline", 2), ("streamconv", 2)]
    for c in result["cases"]:
        assert c["tokens"] > 100_000 and c["seconds"] > 0 and c["peak_rss_bytes"] > 20 * 2**20
