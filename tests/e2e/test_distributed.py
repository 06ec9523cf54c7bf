"""The same plan on a dask.distributed cluster: tasks in other processes pwrite into the same files."""

import pytest

from tests.e2e.test_hf2mcore import check

distributed = pytest.importorskip("distributed")


def test_plan_runs_on_a_local_cluster(tiny_hf, tmp_path):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        check(tiny_hf, tmp_path, "fp8", 2, 2, 2, True, 1, scheduler=cluster.scheduler_address,
              band_bytes=4096, max_memory=8 << 20)
