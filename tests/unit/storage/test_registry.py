"""The format registry and the text format: names, lookup errors, registration rules, sniffing, pickling,
and plan loading against the registry."""

from __future__ import annotations

import os
import pickle
import zlib

import pytest

from streamconv.errors import ExecutionError, PlanError, ValidationError
from streamconv.plan.plan import Plan
from streamconv.storage import fileio, registry
from streamconv.storage.base import TensorFormat
from streamconv.storage.megatron_pt import MEGATRON_PT
from streamconv.storage.safetensors import SAFETENSORS
from streamconv.storage.text import TEXT


def test_built_in_formats_in_registration_order():
    assert registry.format_names() == ("megatron_pt", "safetensors", "text", "zarr")
    assert registry.get_format("megatron_pt") is MEGATRON_PT and registry.get_format("text") is TEXT
    assert [registry.get_format(n).is_text for n in registry.format_names()] == [False, False, True, False]


def test_unknown_name_is_one_line_listing_the_known_ones():
    with pytest.raises(ValidationError) as info:
        registry.get_format("torch_dist")
    message = str(info.value)
    assert message.startswith("format 'torch_dist': not registered (expected one of megatron_pt, safetensors, "
                              "text, zarr)")
    assert "\n" not in message


class _Fake(TensorFormat):
    name = "fake"
    sniff = classmethod(lambda cls, head: head.startswith(b"FAKE"))
    digest = compute_layout = create = write_piece = finish = abort = check_file = lambda self, *a, **k: None


def test_registration(monkeypatch):
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    fake = _Fake()
    assert registry.register_format(fake) is fake
    registry.register_format(fake)  # the same object again: a no-op
    assert registry.format_names()[-1] == "fake" and registry.get_format("fake") is fake
    with pytest.raises(ValidationError, match="'fake' is already registered"):
        registry.register_format(_Fake())
    with pytest.raises(ValidationError, match="expected a TensorFormat instance"):
        registry.register_format(SAFETENSORS.__class__)
    nameless = type("Nameless", (_Fake,), {"name": ""})()
    with pytest.raises(ValidationError, match="name '' of Nameless"):
        registry.register_format(nameless)


def test_format_of_file_sniffs(tmp_path):
    files = {"a.json": b'{"a": 1}\n', "tracker": b"1", "empty": b"", "bin": bytes(range(256)),
             "latin1": "caf\xe9 au lait".encode("latin-1")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    found = {name: registry.format_of_file(str(tmp_path / name)) for name in files}
    assert found == {"a.json": TEXT, "tracker": TEXT, "empty": TEXT, "bin": None, "latin1": None}
    assert registry.digest_of_file(str(tmp_path / "bin")) == "" == registry.digest_of_file(str(tmp_path / "tracker"))
    # a UTF-8 character cut by the sniffing window is still text
    (tmp_path / "long").write_bytes(("x" * 63 + "é" + "y").encode())
    assert registry.format_of_file(str(tmp_path / "long")) is TEXT


@pytest.mark.parametrize("name", registry.format_names())
def test_formats_pickle_by_class(name):
    fmt = registry.get_format(name)
    back = pickle.loads(pickle.dumps(fmt))
    assert type(back) is type(fmt) and back.name == name


def test_text_format_steps(tmp_path):
    path = str(tmp_path / "sub" / "config.json")
    os.makedirs(os.path.dirname(path))
    layout = TEXT.compute_layout((), text='{"k": "é"}\n')
    assert layout == TEXT.compute_layout([], text='{"k": "é"}\n') and hash(layout)
    TEXT.create(path, layout)
    assert not os.path.exists(path) and os.path.exists(fileio.temp_name(path))
    with pytest.raises(ExecutionError, match="no tensor entries"):
        TEXT.write_piece(path, layout, 0, b"x")
    crcs = TEXT.finish(path, layout, [])
    data = open(path, "rb").read()
    assert data == '{"k": "é"}\n'.encode() and crcs == [zlib.crc32(data)]
    assert os.listdir(tmp_path / "sub") == ["config.json"]
    record = {"size": len(data), "crc32": crcs}
    assert TEXT.check_file(path, record, layout) == (0, []) and TEXT.check_file(path, record) == (0, [])
    with open(path, "r+b") as f:
        f.write(b"[")
    assert "differs from the plan's" in TEXT.check_file(path, record, layout).problems[0]
    assert "checksum differs from the journal" in TEXT.check_file(path, record).problems[0]
    TEXT.abort(path)  # nothing to remove; the final name stays
    assert os.path.exists(path)
    assert TEXT.compute_layout((), text=None).text == ""
    with pytest.raises(ValidationError, match="A text file holds only its text"):
        TEXT.compute_layout([("", "w", "float32", (1,))], text="x")


def test_tensor_formats_refuse_text():
    for fmt in (SAFETENSORS, MEGATRON_PT):
        with pytest.raises(ValidationError, match="Only a text format holds text"):
            fmt.compute_layout([], text="x")


def test_plan_loading_checks_format_names_against_the_registry():
    obj = {"schema_version": 1, "kind": "hf2mcore", "nodes": [], "source": {"root": "s", "files": []},
           "target": {"root": "t", "files": [{"path": "a.dcp", "format": "torch_dist"}]}}
    with pytest.raises(PlanError, match=r"a.dcp: unknown format 'torch_dist' \(expected one of \('megatron_pt', "
                                        r"'safetensors', 'text', 'zarr'\)\)"):
        Plan.from_json(obj)
    obj["target"]["files"][0]["format"] = "text"
    assert Plan.from_json(obj).files[0].format == "text"
