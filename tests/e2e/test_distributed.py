"""The same plan on a dask.distributed cluster: tasks in other processes pwrite into the same files."""

import pytest

from tests.e2e.test_hf2mcore import check

distributed = pytest.importorskip("distributed")


def test_plan_runs_on_a_local_cluster(tiny_hf, tmp_path):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        check(tiny_hf, tmp_path, "fp8", 2, 2, 2, True, 1, scheduler=cluster.scheduler_address,
              band_bytes=4096, max_memory=8 << 20)


def test_mcore2hf_runs_on_a_local_cluster(tiny_hf, tmp_path):
    """The reverse plan (safetensors writer, replica checks first) on worker processes."""
    from streamconv.execute.executor import RunOptions, run_plan
    from streamconv.layout.parallel import ParallelSizes
    from streamconv.layout.options import McoreOptions
    from streamconv.plan.mcore2hf import plan_mcore_to_hf
    from tests.e2e.test_mcore2hf import digest, load_dir, to_mcore

    mcore = to_mcore(tiny_hf["bf16"], str(tmp_path / "mcore"), tp=2, pp=2, ep=2, moe_grouped_gemm=True,
                     mtp_num_layers=1)

    out = str(tmp_path / "hf")
    plan = plan_mcore_to_hf(mcore, out, ParallelSizes(2, 2, 2), McoreOptions(moe_grouped_gemm=True, mtp_num_layers=1))
    assert plan.checks
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        run_plan(plan, RunOptions(scheduler=cluster.scheduler_address, band_bytes=4096, max_memory=8 << 20))
    want, got = load_dir(tiny_hf["bf16"]), load_dir(out)
    assert sorted(got) == sorted(want) and all(digest(got[k]) == digest(v) for k, v in want.items())
