"""Spec section 4: placement of layers over PP, VPP, noop layers, num-layer-list and dualpipev (4.2-4.5), EP
(4.6) and expert-tensor-parallel-size 1 (4.7); the placement function alone and end to end on the tiny checkpoint
(4 HF layers, K = 1, MTP HF layer 4)."""

import pytest
import torch

from tests.hf_tiny import build_tiny_hf
from tests.reference import (
    assert_same_checkpoint,
    load_hf,
    reference_final_chunk,
    reference_hf_to_mcore,
    reference_placement,
)
from tests.reference_suite.helpers import (
    _attn_mlp_keys,
    _expert_pieces,
    _layers_of,
    _whole,
    rank_dir_name_,
    rank_path,
    same,
    state,
)


# --------------------------------------------------------------------------------------------------
# first_k_dense_replace remap (4.2) and PP stages (4.3)


def test_first_k_dense_replace_remap(tmp_path):
    build_tiny_hf(tmp_path, first_k_dense_replace=2)
    _, w = load_hf(str(tmp_path))

    def hf_source(sd, local):
        norm = sd[f"decoder.layers.{local}.input_layernorm.weight"]
        for i in range(4):
            if same(norm, w[f"model.layers.{i}.input_layernorm.weight"]):
                return i
        raise AssertionError("no source")

    def is_dense(sd, local):
        return f"decoder.layers.{local}.mlp.linear_fc1.weight" in sd

    sd = state(reference_hf_to_mcore(str(tmp_path), first_k_dense_replace=1, num_layers=3), "mp_rank_00")
    assert [hf_source(sd, l) for l in range(3)] == [0, 2, 3]
    assert [is_dense(sd, l) for l in range(3)] == [True, False, False]
    sd = state(reference_hf_to_mcore(str(tmp_path), first_k_dense_replace=0, num_layers=2), "mp_rank_00")
    assert [hf_source(sd, l) for l in range(2)] == [2, 3]
    assert [is_dense(sd, l) for l in range(2)] == [False, False]
    sd = state(reference_hf_to_mcore(str(tmp_path)), "mp_rank_00")
    assert [hf_source(sd, l) for l in range(4)] == [0, 1, 2, 3]
    assert [is_dense(sd, l) for l in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        reference_hf_to_mcore(str(tmp_path), first_k_dense_replace=1, num_layers=4)


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_pp_stages_restart_local_indices(bf16_dir, hf, pp):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=pp)
    per = 4 // pp
    for p in range(pp):
        name = "mp_rank_00" if pp == 1 else f"mp_rank_00_{p:03d}"
        sd = state(out, name)
        layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
        assert layers == list(range(per))
        for local in range(per):
            g = p * per + local
            assert same(sd[f"decoder.layers.{local}.input_layernorm.weight"],
                        w[f"model.layers.{g}.input_layernorm.weight"])
            assert same(sd[f"decoder.layers.{local}.pre_mlp_layernorm.weight"],
                        w[f"model.layers.{g}.post_attention_layernorm.weight"])
            assert (f"decoder.layers.{local}.mlp.linear_fc1.weight" in sd) == (g < 1)
        assert ("embedding.word_embeddings.weight" in sd) == (p == 0)
        assert ("output_layer.weight" in sd) == ("decoder.final_layernorm.weight" in sd) == (p == pp - 1)


# --------------------------------------------------------------------------------------------------
# reference_placement: noop layers, num-layer-list, VPP, dualpipev (spec 4.2-4.5)


def _slots(*hf):
    """[(local, hf)] with local indices 0, 1, ... (a chunk without gaps)."""
    return list(enumerate(hf))


@pytest.mark.parametrize(
    "num_layers,pp,kwargs,want",
    [
        # 4.3 even split, noop {3}: stage 0 keeps local 0..2, stage 1 local 0..3 <- HF 3..6
        (8, 2, {"noop_layers": [3]}, {(0, 0): _slots(0, 1, 2), (1, 0): _slots(3, 4, 5, 6)}),
        # 4.3 gaps stay: noop {1} on stage 0 leaves local 0 and 2
        (6, 2, {"noop_layers": [1]}, {(0, 0): [(0, 0), (2, 1)], (1, 0): _slots(2, 3, 4)}),
        # 4.3 num-layer-list, any L
        (4, 2, {"num_layer_list": [1, 3]}, {(0, 0): _slots(0), (1, 0): _slots(1, 2, 3)}),
        (5, 3, {"num_layer_list": [2, 1, 2]}, {(0, 0): _slots(0, 1), (1, 0): _slots(2), (2, 0): _slots(3, 4)}),
        # 4.4 the code's own example: L = 8, PP = 2, s = 2
        (8, 2, {"vpp_layers": 2}, {(0, 0): _slots(0, 1), (0, 1): _slots(4, 5),
                                   (1, 0): _slots(2, 3), (1, 1): _slots(6, 7)}),
        (4, 2, {"vpp_layers": 1}, {(0, 0): _slots(0), (0, 1): _slots(2), (1, 0): _slots(1), (1, 1): _slots(3)}),
        # 4.5 dualpipev examples
        (8, 2, {"dualpipev": True}, {(0, 0): _slots(0, 1), (0, 1): _slots(6, 7),
                                     (1, 0): _slots(2, 3), (1, 1): _slots(4, 5)}),
        (8, 4, {"dualpipev": True}, {(0, 0): _slots(0), (0, 1): _slots(7), (1, 0): _slots(1), (1, 1): _slots(6),
                                     (2, 0): _slots(2), (2, 1): _slots(5), (3, 0): _slots(3), (3, 1): _slots(4)}),
        (4, 1, {"dualpipev": True, "noop_layers": [1]}, {(0, 0): _slots(0), (0, 1): _slots(1, 2)}),
    ],
)
def test_placement_small_examples(num_layers, pp, kwargs, want):
    assert reference_placement(num_layers, pp, **kwargs) == want


def test_placement_vpp_rsh_example():
    """Spec 4.4 worked example (R-sh): L = 64, PP = 8, s = 2, noop {47, 62, 63}, MTP 1."""
    place = reference_placement(64, 8, vpp_layers=2, noop_layers=[47, 62, 63])
    assert sorted(place) == [(p, v) for p in range(8) for v in range(4)]
    assert place[(0, 0)] == _slots(0, 1)
    assert place[(0, 1)] == _slots(16, 17)
    assert place[(0, 2)] == _slots(32, 33)
    assert place[(0, 3)] == _slots(47, 48)  # slots 48, 49
    assert place[(7, 0)] == _slots(14, 15)
    assert place[(7, 1)] == _slots(30, 31)
    assert place[(7, 2)] == [(0, 46)]  # slot 47 is noop
    assert place[(7, 3)] == []  # slots 62, 63 are noop
    assert reference_final_chunk(64, 8, vpp_layers=2) == (7, 3)  # final norm, output_layer, MTP (HF 61)
    assert sorted(hf for chunk in place.values() for _, hf in chunk) == list(range(61))


def test_placement_dualpipev_production_example():
    """Spec 4.5 production pretrain script: L = 64, PP = 8, noop {61, 62, 63}, s = 4."""
    place = reference_placement(64, 8, dualpipev=True, noop_layers=[61, 62, 63])
    assert sorted(place) == [(p, v) for p in range(8) for v in range(2)]
    assert place[(0, 0)] == _slots(0, 1, 2, 3)
    assert place[(0, 1)] == [(0, 60)]  # slots 60..63, only local 0 is real
    assert place[(1, 0)] == _slots(4, 5, 6, 7)
    assert place[(1, 1)] == _slots(56, 57, 58, 59)
    assert place[(7, 0)] == _slots(28, 29, 30, 31)
    assert place[(7, 1)] == _slots(32, 33, 34, 35)
    # final norm, output_layer and MTP (HF num_hidden_layers + 0 = 61) go next to HF 60
    assert reference_final_chunk(64, 8, dualpipev=True) == (0, 1)
    assert sorted(hf for chunk in place.values() for _, hf in chunk) == list(range(61))


def test_placement_num_layer_list_sft_example():
    counts = [7, 7, 7, 8, 8, 8, 8, 8]
    place = reference_placement(61, 8, num_layer_list=counts)
    start = 0
    for p, a in enumerate(counts):
        assert place[(p, 0)] == _slots(*range(start, start + a))
        start += a
    assert reference_final_chunk(61, 8) == (7, 0)


def test_placement_uses_the_given_hf_list():
    # the first_k_dense_replace remap (K' = 1 of K = 3): HF 1, 2 skipped
    place = reference_placement(6, 2, [0, 3, 4, 5, 6], noop_layers=[2])
    assert place == {(0, 0): [(0, 0), (1, 3)], (1, 0): _slots(4, 5, 6)}


@pytest.mark.parametrize(
    "num_layers,pp,kwargs",
    [
        (8, 2, {"vpp_layers": 2}),
        (12, 3, {"vpp_layers": 2, "noop_layers": [0, 5, 11]}),
        (24, 2, {"vpp_layers": 3}),
        (12, 3, {"dualpipev": True, "noop_layers": [4, 10]}),
        (16, 2, {"dualpipev": True}),
        (10, 2, {"noop_layers": [9]}),
        (9, 3, {"num_layer_list": [4, 1, 4]}),
    ],
)
def test_placement_covers_every_real_slot_once(num_layers, pp, kwargs):
    place = reference_placement(num_layers, pp, **kwargs)
    noop = set(kwargs.get("noop_layers", ()))
    hf_all = sorted(hf for chunk in place.values() for _, hf in chunk)
    assert hf_all == list(range(num_layers - len(noop)))
    for chunk in place.values():
        locals_ = [local for local, _ in chunk]
        hfs = [hf for _, hf in chunk]
        assert locals_ == sorted(set(locals_)) and hfs == sorted(hfs)  # ascending slot order in a chunk


# --------------------------------------------------------------------------------------------------
# end to end on the tiny checkpoint


CHUNKED_TOP = ["checkpoint_version", "iteration", "model0", "model1"]


FINAL_NO_MTP = ["decoder.final_layernorm.weight", "output_layer.weight"]


def _mtp_tail(n_local):
    """Final norm, output_layer and MTP module 0 keys (local experts), in order."""
    return (["final_layernorm.weight", "output_layer.weight",
             "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight"]
            + _attn_mlp_keys("mtp.layers.0.transformer_layer.", dense=False, n_local=n_local, gemm=False)
            + ["mtp.final_layernorms.0.weight"])


MTP_TAIL = _mtp_tail(4)  # EP 2


MTP_TAIL_EP1 = _mtp_tail(8)


def test_e2e_vpp_pp2_s1_mtp(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, tp=2, pp=2, ep=2, mtp_num_layers=1, vpp_layers=1)
    names = [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {rank_path(n) for n in names}
    for t in range(2):
        for e in range(2):
            f0 = out[rank_path(f"mp_rank_{t:02d}_000_{e:03d}")]
            f1 = out[rank_path(f"mp_rank_{t:02d}_001_{e:03d}")]
            assert list(f0) == CHUNKED_TOP and list(f1) == CHUNKED_TOP
            assert type(f0["checkpoint_version"]) is float and f0["iteration"] == 1
            # slot g -> chunk g, pp = g % 2, v = g // 2
            assert _layers_of(f0["model0"], w) == [(0, 0)]
            assert _layers_of(f1["model0"], w) == [(0, 1)]
            assert _layers_of(f0["model1"], w) == [(0, 2)]
            assert _layers_of(f1["model1"], w) == [(0, 3)]
            emb = "embedding.word_embeddings.weight"
            assert list(f0["model0"]) == [emb] + _attn_mlp_keys("decoder.layers.0.", dense=True)
            assert list(f1["model0"]) == _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False)
            assert list(f0["model1"]) == _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False)
            assert list(f1["model1"]) == (
                [emb] + _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False) + MTP_TAIL
            )
            assert same(f0["model0"][emb], torch.chunk(w["model.embed_tokens.weight"], 2, 0)[t])
            assert same(f1["model1"][emb], torch.chunk(w["model.layers.4.embed_tokens.weight"], 2, 0)[t])
            assert same(f1["model1"]["mtp.layers.0.enorm.weight"], w["model.layers.4.enorm.weight"])


def test_e2e_vpp_pp1_keeps_one_embedding(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, vpp_layers=2, mtp_num_layers=1)
    f = out[rank_path("mp_rank_00")]
    assert list(f) == CHUNKED_TOP
    assert _layers_of(f["model0"], w) == [(0, 0), (1, 1)]
    assert _layers_of(f["model1"], w) == [(0, 2), (1, 3)]
    assert "embedding.word_embeddings.weight" in f["model0"]
    assert "embedding.word_embeddings.weight" not in f["model1"]  # no MTP copy with PP = 1
    assert list(f["model1"])[-len(MTP_TAIL_EP1):] == MTP_TAIL_EP1


def test_e2e_noop_counts_in_num_layers(bf16_dir, hf):
    _, w = hf
    sd = state(reference_hf_to_mcore(bf16_dir, num_layers=5, noop_layers=[2]), "mp_rank_00")
    assert _layers_of(sd, w) == [(0, 0), (1, 1), (3, 2), (4, 3)]  # local 2 stays a gap
    assert not any(k.startswith("decoder.layers.2.") for k in sd)
    out = reference_hf_to_mcore(bf16_dir, pp=2, num_layers=4, noop_layers=[1])
    assert set(out[rank_path("mp_rank_00_000")]) == {"model", "checkpoint_version", "iteration"}
    assert _layers_of(state(out, "mp_rank_00_000"), w) == [(0, 0)]
    assert _layers_of(state(out, "mp_rank_00_001"), w) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="real layers"):
        reference_hf_to_mcore(bf16_dir, num_layers=6, noop_layers=[0])  # 5 real > 4 HF layers


def test_e2e_noop_with_vpp_empty_final_chunk(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=2, vpp_layers=1, num_layers=4, noop_layers=[3], mtp_num_layers=1)
    f1 = out[rank_path("mp_rank_00_001")]
    assert _layers_of(f1["model0"], w) == [(0, 1)]
    assert _layers_of(f1["model1"], w) == []
    assert list(f1["model1"]) == ["embedding.word_embeddings.weight"] + MTP_TAIL_EP1


def test_e2e_dualpipev_pp2(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=2, ep=2, mtp_num_layers=1, dualpipev=True)
    names = [f"mp_rank_00_{p:03d}_{e:03d}" for p in range(2) for e in range(2)]
    assert set(out) == {"latest_checkpointed_iteration.txt"} | {rank_path(n) for n in names}
    moe0 = _attn_mlp_keys("decoder.layers.0.", dense=False, n_local=4, gemm=False)
    emb = "embedding.word_embeddings.weight"
    for e in range(2):
        f0 = out[rank_path(f"mp_rank_00_000_{e:03d}")]
        f1 = out[rank_path(f"mp_rank_00_001_{e:03d}")]
        assert list(f0) == CHUNKED_TOP and list(f1) == CHUNKED_TOP
        # s = 1: pp0 = [0 | 3], pp1 = [1 | 2]
        assert _layers_of(f0["model0"], w) == [(0, 0)]
        assert _layers_of(f0["model1"], w) == [(0, 3)]
        assert _layers_of(f1["model0"], w) == [(0, 1)]
        assert _layers_of(f1["model1"], w) == [(0, 2)]
        assert list(f0["model0"]) == [emb] + _attn_mlp_keys("decoder.layers.0.", dense=True)
        assert list(f0["model1"]) == [emb] + moe0 + MTP_TAIL  # MTP embedding copy with PP > 1
        assert list(f1["model0"]) == moe0 and list(f1["model1"]) == moe0
        assert same(f0["model0"][emb], w["model.embed_tokens.weight"])
        assert same(f0["model1"][emb], w["model.layers.4.embed_tokens.weight"])
        assert same(f0["model1"]["mtp.layers.0.hnorm.weight"], w["model.layers.4.hnorm.weight"])


def test_e2e_dualpipev_pp1_noop_no_mtp(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, num_layers=4, noop_layers=[1], dualpipev=True)
    f = out[rank_path("mp_rank_00")]
    assert list(f) == CHUNKED_TOP
    assert _layers_of(f["model0"], w) == [(0, 0)]  # slot 1 is noop
    assert _layers_of(f["model1"], w) == [(0, 1), (1, 2)]  # HF = slot - #noop below
    assert "embedding.word_embeddings.weight" in f["model0"]
    assert "embedding.word_embeddings.weight" not in f["model1"]
    assert list(f["model1"])[-2:] == FINAL_NO_MTP


def test_e2e_dualpipev_first_k_dense_replace(tmp_path):
    build_tiny_hf(tmp_path, first_k_dense_replace=2)
    _, w = load_hf(str(tmp_path))
    out = reference_hf_to_mcore(str(tmp_path), pp=2, dualpipev=True)
    f0 = out[rank_path("mp_rank_00_000")]
    f1 = out[rank_path("mp_rank_00_001")]
    assert _layers_of(f0["model0"], w) == [(0, 0)] and _layers_of(f1["model0"], w) == [(0, 1)]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in f1["model0"]  # HF 1 < K = 2: dense
    assert "decoder.layers.0.mlp.router.weight" in f1["model1"]  # HF 2: MoE
    same_k = reference_hf_to_mcore(str(tmp_path), pp=2, dualpipev=True, first_k_dense_replace=2)
    assert_same_checkpoint(same_k, out, check_order=True)
    # the remap is not applied under dualpipev (spec 4.2, 10.6): asking for it is an error
    with pytest.raises(ValueError, match="first_k_dense_replace 1 is not supported with dualpipev"):
        reference_hf_to_mcore(str(tmp_path), pp=2, dualpipev=True, first_k_dense_replace=1)


def test_e2e_num_layer_list(bf16_dir, hf):
    _, w = hf
    out = reference_hf_to_mcore(bf16_dir, pp=2, mtp_num_layers=1, num_layer_list=[1, 3])
    f0 = out[rank_path("mp_rank_00_000")]
    assert list(f0) == ["model", "checkpoint_version", "iteration"]
    assert _layers_of(f0["model"], w) == [(0, 0)]
    sd1 = state(out, "mp_rank_00_001")
    assert _layers_of(sd1, w) == [(0, 1), (1, 2), (2, 3)]
    assert list(sd1)[0] == "embedding.word_embeddings.weight" and list(sd1)[-len(MTP_TAIL_EP1):] == MTP_TAIL_EP1
    sd = state(reference_hf_to_mcore(bf16_dir, pp=2, num_layers=3, num_layer_list=[2, 1]), "mp_rank_00_001")
    assert _layers_of(sd, w) == [(0, 2)]


# --------------------------------------------------------------------------------------------------
# EP (4.6) and expert-tensor-parallel-size 1 (4.7)


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_ep_union_covers_every_expert_once(bf16_dir, hf, ep, gemm):
    _, w = hf
    n = 8 // ep
    out = reference_hf_to_mcore(bf16_dir, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1)
    names = ["mp_rank_00"] if ep == 1 else [f"mp_rank_00_{e:03d}" for e in range(ep)]
    for prefix, layer in [("decoder.layers.3.", 3), ("mtp.layers.0.transformer_layer.", 4)]:
        experts = {j: w[f"model.layers.{layer}.mlp.experts.{j}.down_proj.weight"] for j in range(8)}
        seen = []
        for e, name in enumerate(names):
            sd = state(out, name)
            for q in range(n):
                if gemm:
                    down = sd[prefix + "mlp.experts.weight2"].view(n, -1, 64)[q].t()
                else:
                    down = sd[prefix + f"mlp.experts.local_experts.{q}.linear_fc2.weight"]
                found = [j for j, x in experts.items() if same(down, x)]
                assert found == [e * n + q]  # contiguous blocks, local renumbering
                seen += found
        assert sorted(seen) == list(range(8))
    # every non-expert tensor is identical on all EP ranks
    ref = state(out, names[0])
    for name in names[1:]:
        sd = state(out, name)
        common = [k for k in ref if ".experts." not in k]
        assert common == [k for k in sd if ".experts." not in k]
        assert all(same(sd[k], ref[k]) for k in common)


@pytest.mark.parametrize(
    "tp,ep,pairs",
    [
        (4, 2, [(0, 0), (1, 1), (2, 0), (3, 1)]),
        (2, 4, [(0, 0), (1, 1), (0, 2), (1, 3)]),
        (2, 2, [(0, 0), (1, 1)]),
        (4, 1, [(0, 0), (1, 0), (2, 0), (3, 0)]),
        (1, 8, [(0, e) for e in range(8)]),
    ],
)
@pytest.mark.parametrize("gemm", [False, True])
def test_etp1_file_set_and_whole_experts(bf16_dir, hf, tp, ep, pairs, gemm):
    c, w = hf
    h, fm, e_total = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    n = e_total // ep
    out = reference_hf_to_mcore(bf16_dir, tp=tp, pp=2, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1,
                                expert_tensor_parallel_size=1)
    want = {rank_path(rank_dir_name_(t, e, ep, p)) for t, e in pairs for p in range(2)}
    assert set(out) == {"latest_checkpointed_iteration.txt"} | want
    base = reference_hf_to_mcore(bf16_dir, tp=tp, pp=2, ep=ep, moe_grouped_gemm=gemm, mtp_num_layers=1)
    for p, pre, hf_i in [(0, "decoder.layers.1.", 1), (1, "decoder.layers.1.", 3),
                         (1, "mtp.layers.0.transformer_layer.", 4)]:
        covered = {}
        for t, e in pairs:
            name = rank_dir_name_(t, e, ep, p)
            sd, bsd = state(out, name), state(base, name)
            for key in sd:  # non-expert tensors TP-split by t as usual
                if ".mlp.experts." not in key:
                    assert same(sd[key], bsd[key]), key
            if gemm:
                assert tuple(sd[pre + "mlp.experts.weight1"].shape) == (h, n * 2 * fm)
                assert tuple(sd[pre + "mlp.experts.weight2"].shape) == (n * fm, h)
            for q, (fc1, fc2) in enumerate(_expert_pieces(sd, pre, gemm, n, h, fm)):
                j = e * n + q
                want1, want2 = _whole(w, hf_i, j)
                assert same(fc1.contiguous(), want1) and same(fc2.contiguous(), want2)
                covered.setdefault(j, set()).add(t)
        assert sorted(covered) == list(range(e_total))  # every expert present, whole


def test_etp1_tp1_equals_default_and_validation(bf16_dir, tmp_path):
    kwargs = dict(pp=2, ep=4, moe_grouped_gemm=True, mtp_num_layers=1)
    assert_same_checkpoint(reference_hf_to_mcore(bf16_dir, expert_tensor_parallel_size=1, **kwargs),
                           reference_hf_to_mcore(bf16_dir, **kwargs), check_order=True)
    build_tiny_hf(tmp_path, n_routed_experts=12)
    with pytest.raises(ValueError, match="tp % ep"):  # ep 6 divides 12 experts, but neither of tp 4, ep 6 divides the other
        reference_hf_to_mcore(str(tmp_path), tp=4, ep=6, expert_tensor_parallel_size=1)
    with pytest.raises(ValueError, match="dualpipev"):
        reference_hf_to_mcore(bf16_dir, tp=2, pp=2, dualpipev=True, expert_tensor_parallel_size=1)
    with pytest.raises(ValueError, match="None or 1"):
        reference_hf_to_mcore(bf16_dir, tp=2, expert_tensor_parallel_size=2)
