"""execute/copy.py: the fast paths give exactly torch's results."""

import pytest
import torch

from streamconv.execute import copy as fastcopy

DTYPES = [torch.bfloat16, torch.float32, torch.uint8, torch.float64, torch.float8_e4m3fn]


def _rand(shape, dtype):
    return torch.randint(0, 255, shape, dtype=torch.uint8).view(torch.uint8).to(torch.float32).to(dtype) \
        if dtype.is_floating_point and dtype.itemsize > 1 else \
        torch.randint(0, 255, shape, dtype=torch.uint8).view(dtype)


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(_bits(a), _bits(b))


def _torch_cat(parts, dim):
    if parts[0].element_size() == 1:  # torch.cat has no float8 kernel on CPU: concatenate the bytes
        return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim).view(parts[0].dtype)
    return torch.cat([p.contiguous() for p in parts], dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 5), (2, 3), (129, 257), (1, 7), (7, 1), (0, 4)])
def test_contiguous_of_transpose(dtype, shape):
    base = _rand(shape, dtype)
    view = base.t()
    out = fastcopy.contiguous(view)
    assert out.is_contiguous()
    _same(out, view)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cat_of_transposes_and_plain_parts(dtype):
    parts = (_rand((40, 300), dtype).t(), _rand((300, 40), dtype), _rand((40, 300), dtype)[:, ::1].t())
    _same(fastcopy.cat(parts, 1), _torch_cat(parts, 1))
    rows = (_rand((300, 7), dtype).t(), _rand((300, 3), dtype).t())
    _same(fastcopy.cat(rows, 0), _torch_cat(rows, 0))


def test_other_strides_fall_back():
    x = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5).permute(2, 0, 1)
    assert torch.equal(fastcopy.contiguous(x), x.contiguous())
    y = torch.arange(100, dtype=torch.float32).reshape(10, 10)[::2, 1:]
    assert torch.equal(fastcopy.contiguous(y), y.contiguous())
