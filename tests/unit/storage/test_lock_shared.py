"""The save dir's lock in shared mode (parts of a split plan) against exclusive holders (whole runs, --finish).

flock locks belong to open file descriptions, so two TargetLock objects in one process conflict exactly as two
processes would."""

import os

import pytest

from streamconv.errors import ExecutionError
from streamconv.storage.lock import TargetLock


def test_shared_holders_coexist_and_exclude_an_exclusive_one(tmp_path):
    path = str(tmp_path / ".streamconv.lock")
    with TargetLock(path, shared=True), TargetLock(path, shared=True):
        with pytest.raises(ExecutionError, match="another streamconv run"):
            TargetLock(path).__enter__()
    assert os.path.exists(path)        # shared holders never remove the file (others may hold it)
    with TargetLock(path):             # free again once every shared holder left
        with pytest.raises(ExecutionError, match="another streamconv run"):
            TargetLock(path, shared=True).__enter__()
        with open(path) as f:
            assert f.read().strip() == str(os.getpid())
    assert not os.path.exists(path)    # the exclusive holder removes it, as before


def test_a_shared_holder_writes_no_pid(tmp_path):
    path = str(tmp_path / ".streamconv.lock")
    with TargetLock(path, shared=True):
        assert os.path.getsize(path) == 0
