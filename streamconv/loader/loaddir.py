"""A load directory: what ``streamconv prepare-load`` writes for a training job's ``--load``.

    DIR/streamconv_load.json                where the weights come from (a plan, or an HF dir + layout) and how
    DIR/latest_checkpointed_iteration.txt   Megatron's tracker ("1"), written last
    DIR/README                              what this directory is, for whoever lists it

No weights: each rank materialises its own tensors from the source when Megatron asks for them (the hook in
:mod:`streamconv.loader.megatron`).  The description is JSON with a ``schema_version``; a plan is named by
absolute path and sha256, so a plan changed after ``prepare-load`` is refused rather than loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from ..errors import PlanError, ValidationError
from ..layout.parallel import ParallelSizes, RankFile, iter_dir, rank_dir
from ..plan.plan import Plan
from ..storage import fileio
from .rank import LoadOptions, RankSource
from .source import LAYOUT_KEYWORDS, RANK_PLAN_KINDS, check_sources, layout_from_keywords

DESCRIPTION = "streamconv_load.json"
TRACKER = "latest_checkpointed_iteration.txt"
README = "README"
SCHEMA_VERSION = 1
ITERATION = 1


@dataclass(frozen=True)
class LoadDir:
    """A parsed ``streamconv_load.json``."""

    path: str                          # the load directory
    plan: str | None = None            # absolute path of a saved plan ...
    plan_sha256: str | None = None
    hf_dir: str | None = None          # ... or an HF checkpoint directory planned per rank with ``layout``
    layout: dict = field(default_factory=dict)
    source_root: str | None = None     # the plan's sources, resolved when the directory was prepared
    target: dict = field(default_factory=dict)   # {"tp", "pp", "ep"}
    model: dict = field(default_factory=dict)    # the McoreOptions the weights are laid out for
    attrs: dict = field(default_factory=dict)    # top-level scalars of a rank file (checkpoint_version ...)
    options: dict = field(default_factory=dict)  # LoadOptions fields: device, dequant_on, method, workers ...

    def load_options(self) -> LoadOptions:
        return LoadOptions(**self.options)

    def open_rank(self, tp_rank: int, pp_rank: int, ep_rank: int) -> RankSource:
        """This directory's rank, checked (plan unchanged, sources unchanged, rank in the layout)."""
        from . import open_rank

        if self.plan is not None:
            if _sha256(self.plan) != self.plan_sha256:
                raise PlanError(f"{self.plan}: changed since `streamconv prepare-load` wrote {self.path}. Run "
                                f"prepare-load again.")
            return open_rank(self.plan, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank,
                             source_root=self.source_root)
        return open_rank(self.hf_dir, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank, **self.layout)


def prepare_load(save_dir: str, *, plan: str | None = None, hf_dir: str | None = None, layout: dict | None = None,
                 options: LoadOptions = LoadOptions(), overwrite: bool = False) -> LoadDir:
    """Check the source (every rank's graphs are planned, the sources are unchanged) and write ``save_dir``.

    Exactly one of ``plan`` (a saved hf2mcore or mcore2mcore plan) and ``hf_dir`` (with ``layout``: keywords named
    after the CLI flags, see :data:`streamconv.loader.LAYOUT_KEYWORDS`)."""
    if (plan is None) == (hf_dir is None):
        raise ValidationError("prepare-load: give a plan, or --load-dir with the layout flags (not both).")
    _check_target(save_dir, overwrite)
    if not isinstance(options.device, str):
        options = LoadOptions(**dict(asdict(options), device=str(options.device)))
    if plan is not None:
        if layout:
            raise ValidationError("prepare-load: layout flags come from the plan; give them only with --load-dir.")
        p = Plan.load(plan)
        if p.kind not in RANK_PLAN_KINDS or "ranks" in p.options:
            raise PlanError(f"{plan}: a {p.kind!r}{' partial' if 'ranks' in p.options else ''} plan; prepare-load "
                            f"takes a whole hf2mcore or mcore2mcore plan.")
        root = os.path.abspath(p.source_root)
        check_sources(dataclasses.replace(p, source_root=root))
        first = next(f for f in p.files if f.tensors)
        desc = LoadDir(os.path.abspath(save_dir), plan=os.path.abspath(plan), plan_sha256=_sha256(plan),
                       source_root=root, target=dict(p.options.get("target") or {}),
                       model=dict(p.options.get("model") or {}), attrs=_scalars(first.attrs),
                       options=asdict(options))
    else:
        layout = dict(layout or {})
        sizes, mcore, _ = layout_from_keywords(layout)
        from . import open_rank

        # Plans rank (0, 0, 0): every check of the source against config.json and of the flags against the
        # model runs here, once, rather than on every rank at start-up.
        first = open_rank(hf_dir, **layout)
        desc = LoadDir(os.path.abspath(save_dir), hf_dir=os.path.abspath(hf_dir), layout=layout,
                       target=asdict(sizes), model=json.loads(json.dumps(asdict(mcore))),
                       attrs=_scalars(tuple(first.attrs.items())), options=asdict(options))
    write_load_dir(desc)
    return desc


def _scalars(attrs) -> dict:
    return {k: v for k, v in attrs if isinstance(v, (int, float, str, bool, type(None)))}


def _check_target(save_dir: str, overwrite: bool) -> None:
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValidationError(f"{save_dir}: exists and is not a directory.")
    if os.path.isdir(save_dir) and not overwrite:
        other = set(os.listdir(save_dir)) - {DESCRIPTION, TRACKER, README}
        if other:
            raise ValidationError(f"{save_dir}: not empty ({', '.join(sorted(other)[:4])}). Choose an empty "
                                  f"--save-dir or pass --overwrite.")


def write_load_dir(desc: LoadDir) -> None:
    """The description, a README, then the tracker (last: its presence marks the directory usable)."""
    os.makedirs(desc.path, exist_ok=True)
    body = {"schema_version": SCHEMA_VERSION, "source": {}, "target": desc.target, "model": desc.model,
            "attrs": desc.attrs, "options": desc.options}
    if desc.plan is not None:
        body["source"] = {"plan": desc.plan, "plan_sha256": desc.plan_sha256, "root": desc.source_root}
    else:
        body["source"] = {"hf": desc.hf_dir, "layout": desc.layout}
    fileio.atomic_write_bytes(os.path.join(desc.path, DESCRIPTION), (json.dumps(body, indent=1) + "\n").encode())
    fileio.atomic_write_bytes(os.path.join(desc.path, README), (
        "Written by `streamconv prepare-load`: no weights here.  Training jobs started with\n"
        "`python -m streamconv.launch` (or with `import streamconv.loader.megatron` after the MindSpeed adaptor)\n"
        "materialise each rank's tensors from the source named in streamconv_load.json.  Without the hook,\n"
        "Megatron finds no iter_* directory here and stops.\n").encode())
    fileio.atomic_write_bytes(os.path.join(desc.path, TRACKER), str(ITERATION).encode())


def read_load_dir(path: str | None) -> LoadDir | None:
    """The load directory at ``path``, or None when ``path`` is not one (no description file)."""
    if not path:
        return None
    file = os.path.join(path, DESCRIPTION)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, "rb") as f:
            body = json.loads(f.read())
        if body.get("schema_version") != SCHEMA_VERSION:
            raise PlanError(f"{file}: schema_version {body.get('schema_version')!r} (expected {SCHEMA_VERSION}). "
                            f"Run `streamconv prepare-load` again with this streamconv version.")
        src = body["source"]
        layout = dict(src.get("layout") or {})
        unknown = sorted(set(layout) - set(LAYOUT_KEYWORDS))
        options = dict(body.get("options") or {})
        unknown += sorted(set(options) - set(LoadOptions.__dataclass_fields__))
        if unknown:
            raise PlanError(f"{file}: unknown fields {unknown}. Run `streamconv prepare-load` again.")
        return LoadDir(os.path.abspath(path), plan=src.get("plan"), plan_sha256=src.get("plan_sha256"),
                       hf_dir=src.get("hf"), layout=layout, source_root=src.get("root"),
                       target=dict(body.get("target") or {}), model=dict(body.get("model") or {}),
                       attrs=dict(body.get("attrs") or {}), options=options)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise PlanError(f"{file}: not a valid load description ({exc.__class__.__name__}: {exc}). Run "
                        f"`streamconv prepare-load` again.") from None


def rank_path(desc: LoadDir, r: RankFile) -> str:
    """Where Megatron's legacy loader would look for rank ``r``'s file in this directory."""
    sizes = ParallelSizes(**{k: int(desc.target.get(k, 1)) for k in ("tp", "pp", "ep")})
    return os.path.join(desc.path, iter_dir(ITERATION), rank_dir(r, sizes), "model_optim_rng.pt")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise PlanError(f"{path}: plan file not found (named by a load directory). Run prepare-load again.") from None
    return h.hexdigest()
