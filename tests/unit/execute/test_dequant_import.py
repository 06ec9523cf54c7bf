"""streamconv.execute.dequant: the numba gather is the one in use when numba imports, it runs without the GIL,
and the module imports quietly in a fresh interpreter with numba, without numba, and without a numba cache."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import streamconv
from streamconv.execute import dequant

HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_fast_path_in_use_and_gil_free():
    assert dequant.have_numba()
    assert dequant._gather_numba is not None
    assert dequant._gather_numba.targetoptions.get("nogil") is True  # two executor threads dequantize at once


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet, this streamconv first on the path), with
    every warning shown."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(streamconv.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-W", "default", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, env=env)


_SMOKE = """
    import torch
    from streamconv.execute import dequant
    w = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128).view(torch.float8_e4m3fn)
    s = torch.tensor([[0.37]])
    assert torch.equal(dequant.dequant_fp8_block(w, s, block=(128, 128)).view(torch.int16), dequant.dequant_reference(w, s, (128, 128)).view(torch.int16))
    print(dequant.HAVE_NUMBA)
"""


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_fresh_import_uses_numba_quietly():
    p = _fresh(_SMOKE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True"] and p.stderr == ""


def test_numba_is_imported_by_the_first_dequantization_not_by_the_executor():
    """A bf16 job (or planning) never imports numba: ~60 MiB and ~0.3 s of start-up it does not need."""
    p = _fresh("""
        import sys
        import streamconv.execute.executor, streamconv.execute.kernels, streamconv.loader
        print("numba" in sys.modules)
        import torch
        from streamconv.execute import dequant, lora
        w = torch.zeros(2, 2, dtype=torch.float8_e4m3fn)
        dequant.dequant_fp8_block(w, torch.ones(1, 1), block=(128, 128))
        print("numba" in sys.modules, dequant.HAVE_NUMBA, lora.HAVE_NUMBA)
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", str(HAS_NUMBA), str(HAS_NUMBA), "None"]


def test_fresh_import_without_numba_falls_back():
    p = _fresh("import sys; sys.modules['numba'] = None\n" + textwrap.dedent(_SMOKE))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False"] and p.stderr == ""


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_fresh_import_without_a_cache_directory():
    """Read-only site-packages and no writable user cache: numba refuses ``cache=True`` at decoration time;
    the kernel must still compile, quietly."""
    block = ("from numba.core import caching\n"
             "(getattr(caching, 'CacheImpl', None) or caching._CacheImpl)._locator_classes = []\n")
    p = _fresh(block + textwrap.dedent(_SMOKE))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True"] and p.stderr == ""
