"""One digest of a rank file's tensors (names, dtypes, shapes, bytes), shared by the tests and the children they
run under other torch versions (imports torch and the standard library only)."""

import hashlib

import torch


def digest(sd: dict) -> str:
    """sha256 over every top-level dict of ``sd`` (``model``, ``model0`` ...) in sorted order, each tensor's name,
    dtype, shape and bytes in the dict's order."""
    h = hashlib.sha256()
    for g in sorted(k for k, v in sd.items() if isinstance(v, dict)):
        for k, t in sd[g].items():
            h.update(f"{g}.{k}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
