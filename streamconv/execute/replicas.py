"""Replica checks: copies of one tensor in several source files must be byte-identical.

A Megatron checkpoint stores every replicated tensor once per rank that holds it (a norm in every TP and EP
rank file, an attention weight in every EP rank file).  A converter that reads one copy and trusts it turns
a silently diverged rank into a silently wrong model.  The plan lists the copies (:class:`ReplicaCheck`);
this compares them band by band (blake2b digests, so memory stays at one band per worker) before the
executor writes anything.
"""

from __future__ import annotations

import hashlib

import dask

from ..errors import ValidationError
from ..graph.rewrite import narrow
from ..plan.plan import Plan
from ..storage.safetensors import tensor_bytes
from .kernels import materialize


def _digest(root: str, node) -> bytes:
    return hashlib.blake2b(tensor_bytes(materialize(node, root)), digest_size=16).digest()


def _bands(node, band_bytes: int) -> list[tuple[int, int]]:
    rows = node.shape[0] if node.shape else 1
    if not node.shape or rows <= 1 or node.nbytes <= band_bytes:
        return [(0, rows)]
    step = max(1, band_bytes // max(node.nbytes // rows, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def check_replicas(plan: Plan, *, band_bytes: int = 64 << 20, num_workers: int = 2) -> int:
    """Compare every copy of every :class:`ReplicaCheck` of ``plan``; raise one :class:`ValidationError`
    naming each tensor whose copies differ, and where.  Returns the number of bytes compared."""
    dsk: dict = {}
    total = 0
    layout = []
    for ci, check in enumerate(plan.checks):
        bands = _bands(check.nodes[0], band_bytes)
        layout.append(bands)
        for k, node in enumerate(check.nodes):
            total += node.nbytes
            for b, (r0, r1) in enumerate(bands):
                part = narrow(node, 0, r0, r1) if node.shape else node
                dsk[("digest", ci, k, b)] = (_digest, plan.source_root, part)
    keys = list(dsk)
    if not keys:
        return 0
    values = dict(zip(keys, dask.threaded.get(dsk, keys, num_workers=num_workers)))
    problems = []
    for ci, check in enumerate(plan.checks):
        for k in range(1, len(check.nodes)):
            for b, (r0, r1) in enumerate(layout[ci]):
                if values[("digest", ci, k, b)] != values[("digest", ci, 0, b)]:
                    problems.append(f"{check.label}: the copy in {check.where[k]} differs from the copy in "
                                    f"{check.where[0]} (rows {r0}-{r1 - 1}). The rank files disagree; restore "
                                    f"them from a good checkpoint (or pass --no-verify-replicas to take the first).")
                    break
    if problems:
        raise ValidationError(problems)
    return total
