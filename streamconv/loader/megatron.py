"""``import streamconv.loader.megatron``: hook Megatron's legacy checkpoint loading (see :mod:`.hook`).

Import it after MindSpeed's adaptor (``import mindspeed_llm`` / ``from mindspeed_llm import megatron_adaptor``)
and before training starts; or run the unchanged script under ``python -m streamconv.launch``.  A ``--load``
directory written by ``streamconv prepare-load`` then gives every rank its own tensors straight from the
source; any other directory loads as before.
"""

from __future__ import annotations

from .hook import install

install()
