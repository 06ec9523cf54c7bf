"""The spec suite: every registered model family passes the same checks, so a new family is tested by
registering it (``streamconv.models``).

1. its HF table is consistent (unique names, quantizable tensors 2-D, copies point at real tensors) and the
   generator writes exactly that table;
2. planning consumes every source tensor once or drops it with a reason, over several layouts;
3. hf -> mcore -> hf gives back every tensor byte for byte over a layout matrix (bf16 and FP8 sources);
4. where transformers has the family's class, the generated checkpoint loads with no missing key, and the
   round-tripped one computes exactly the same logits.
"""


import pytest
import torch

from streamconv import synth
from streamconv.execute.executor import RunOptions, run_plan
from streamconv.layout.options import McoreOptions
from streamconv.layout.parallel import ParallelSizes
from streamconv.mapping.spec import TensorKind
from streamconv.models import models
from streamconv.plan.mcore2hf import plan_mcore_to_hf
from streamconv.plan.planner import plan_hf_to_mcore
from tests.e2e.test_mcore2hf import digest, load_dir

RUN = RunOptions(band_bytes=8192, max_memory=8 << 20)
FAMILIES = sorted(spec.name for spec in models())


def spec_named(name):
    return next(s for s in models() if s.name == name)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(spec, {"bf16": dir, "fp8": dir}) for the family's tiny preset."""
    spec = spec_named(request.param)
    root = tmp_path_factory.mktemp(request.param)
    dirs = {}
    for kind in ("bf16", "fp8") if spec.quant else ("bf16",):
        dirs[kind] = str(root / kind)
        synth.synth_checkpoint(dirs[kind], synth.preset("tiny", spec.name, fp8=kind == "fp8",
                                                        max_shard_bytes=200_000))
    return spec, dirs


def layouts(spec, tiny):
    """A layout matrix the family's tiny preset admits: TP/PP/EP, local experts or grouped GEMM, VPP, noop
    slots, dualpipev with tp-extend-ep, ETP 1, MTP where the family has it."""
    mtp = min(tiny.mtp_layers, 1)
    out = [dict(tp=1, pp=1, ep=1, moe_grouped_gemm=False),
           dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, mtp_num_layers=mtp),
           dict(tp=4, pp=1, ep=2, moe_grouped_gemm=True, expert_tensor_parallel_size=1),
           dict(tp=2, pp=2, ep=1, moe_grouped_gemm=True, vpp_layers=1, mtp_num_layers=mtp),
           dict(tp=2, pp=2, ep=2, moe_grouped_gemm=True, dualpipev=True, moe_tp_extend_ep=True,
                mtp_num_layers=mtp),
           dict(tp=1, pp=2, ep=4, moe_grouped_gemm=False, noop_layers=(1, 3), num_layers=tiny.num_hidden_layers + 2)]
    if "mla_mm_split" in spec.variants:
        out.append(dict(tp=2, pp=1, ep=2, moe_grouped_gemm=True, mla_mm_split=True, mla_key_names="legacy"))
    return out


def split(case):
    case = dict(case)
    sizes = ParallelSizes(case.pop("tp"), case.pop("pp"), case.pop("ep"))
    return sizes, McoreOptions(**case)


def test_hf_table_is_consistent(family):
    spec, _ = family
    cfg = spec.presets["tiny"]
    table = spec.hf_table(cfg)
    assert len(table) == len(spec.hf_tensors(cfg))
    for t in table.values():
        assert all(isinstance(d, int) and d > 0 for d in t.shape), t
        if t.kind is TensorKind.LINEAR:
            assert len(t.shape) == 2, t
        if t.copy_of is not None:
            assert table[t.copy_of].shape == t.shape, t
    assert spec.layer_of(next(iter(table))) is None


def test_generator_writes_exactly_the_hf_table(family):
    spec, dirs = family
    cfg = spec.presets["tiny"]
    for kind, d in dirs.items():
        got = load_dir(d)
        want = set(spec.hf_table(cfg))
        if kind == "fp8":
            want |= {n + spec.quant.scale_suffix for n in want if spec.is_quantized(cfg, n)}
        assert set(got) == want


def test_every_source_tensor_is_consumed_or_dropped_with_a_reason(family, tmp_path):
    spec, dirs = family
    tiny = spec.presets["tiny"]
    for case in layouts(spec, tiny)[:3]:
        sizes, options = split(case)
        for d in dirs.values():
            plan = plan_hf_to_mcore(d, str(tmp_path / "out"), sizes, options)  # raises on an unaccounted tensor
            read = {n.arg.tensor for f in plan.files for t in f.tensors for n in _reads(t.node)}
            dropped = {x.name for x in plan.dropped}
            assert all(x.reason for x in plan.dropped)
            assert not read & dropped
            assert read | dropped == set(load_dir(d))


def _reads(node):
    from streamconv.graph.node import Op, toposort
    return [n for n in toposort([node]) if n.op is Op.READ]


@pytest.mark.parametrize("index", range(7))
def test_hf_to_mcore_to_hf_gives_back_every_tensor(family, tmp_path, index):
    spec, dirs = family
    cases = layouts(spec, spec.presets["tiny"])
    if index >= len(cases):
        pytest.skip(f"{spec.name} has {len(cases)} layouts")
    sizes, options = split(cases[index])
    src = dirs["fp8" if index % 2 and "fp8" in dirs else "bf16"]
    mcore, out = str(tmp_path / "mcore"), str(tmp_path / "hf")
    run_plan(plan_hf_to_mcore(src, mcore, sizes, options), RUN)
    run_plan(plan_mcore_to_hf(mcore, out, sizes, options), RUN)
    want, got = load_dir(dirs["bf16"]), load_dir(out)
    if options.mtp_num_layers == 0:
        first_mtp = spec.presets["tiny"].num_hidden_layers
        want = {k: v for k, v in want.items() if spec.layer_of(k) is None or spec.layer_of(k) < first_mtp}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and digest(got[name]) == digest(t), name


def test_transformers_loads_it_and_the_round_trip_keeps_the_logits(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec, dirs = family
    arch = spec.config_json(spec.presets["tiny"])["architectures"][0]
    if not hasattr(transformers, arch):
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    sizes, options = ParallelSizes(2, 2, 2), McoreOptions(moe_grouped_gemm=True)
    mcore, out = str(tmp_path / "mcore"), str(tmp_path / "hf")
    run_plan(plan_hf_to_mcore(dirs["bf16"], mcore, sizes, options), RUN)
    run_plan(plan_mcore_to_hf(mcore, out, sizes, options), RUN)
    from tests.e2e.test_transformers import logits

    want, got = logits(dirs["bf16"]), logits(out)
    assert want.abs().sum() > 0 and torch.equal(got, want)


def test_expert_stacks_group_each_layer_and_projection(family):
    """What a zarr store stacks: every routed-expert tensor (scales too) of one layer and projection, expert j at
    j; nothing else (shared experts, routers, attention).  The oracle is the HF names' own pattern."""
    import re

    spec, dirs = family
    names = list(load_dir(dirs.get("fp8", dirs["bf16"])))
    groups = {}
    for name in names:
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)(\.\w+\.\w+)$", name)
        hit = spec.expert_stack(name)
        if m is None:
            assert hit is None, name
            continue
        assert hit == (m[1] + "{j}" + m[3], int(m[2])), name
        groups.setdefault(hit[0], set()).add(hit[1])
    cfg = spec.presets["tiny"]
    assert groups and all(js == set(range(cfg.num_experts)) for js in groups.values())
