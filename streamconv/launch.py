"""Run a Megatron / MindSpeed training script with streamconv's checkpoint hook, the script unchanged.

    python -m streamconv.launch pretrain_gpt.py --load ./ds3-load --finetune --no-load-optim --no-load-rng ...
    torchrun --nproc-per-node 16 -m streamconv.launch pretrain_gpt.py ...

The hook (:mod:`streamconv.loader.hook`) is installed the moment ``megatron.training.checkpointing`` has been
imported by the script, so whatever the script imports first (MindSpeed's adaptor included) runs first, as
it would without us.  The script then runs as ``__main__`` with its own arguments.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import runpy
import sys

from .loader.hook import MODULE, install

USAGE = "usage: python -m streamconv.launch SCRIPT.py [SCRIPT ARGUMENTS...]"


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds :data:`MODULE` through the other finders and installs the hook once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)   # one module, once: let the regular finders resolve it
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        install(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallAfterImport)]


def hook_on_import() -> None:
    """Install the hook now if Megatron's checkpointing module is loaded, else as soon as it is imported."""
    if MODULE in sys.modules:
        install(sys.modules[MODULE])
    elif not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"streamconv.launch: error: {script}: no such script. {USAGE}", file=sys.stderr)
        return 2
    hook_on_import()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
