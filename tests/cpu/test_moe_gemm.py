"""Grouped GEMMs of the fused-MoE pipeline without a GPU: the tile heuristic, the spec builder, prewarm, the CPU path
(reference semantics against a per-row loop), every validation error, the fake impl, and nvcc -c of the SM80
template (skipped without nvcc)."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from jitmoe.jit import UnsupportedSpecError, compile_cuda_sources
from jitmoe.jit.arch import find_nvcc
from jitmoe.ops import moe_gemm as mg
from jitmoe.ops.moe_gemm import GemmConfig, moe_gemm1, moe_gemm2, select_config
from jitmoe.reference.moe import apply_activation
from jitmoe.testing import poison_

ARCHS = ("80", "86", "89", "90a", "100a", "120a")
BOTH = ("sm80", "sm90")


# ---------------------------------------------------------------------------------------------------------------
# select_config
@pytest.mark.parametrize("arch", ARCHS)
def test_block_m_grows_with_rows_per_expert(arch):
    for kernel in mg.kernels_for_arch(arch, BOTH):
        block_ms = [select_config(slots, 8, 1024, 2048, arch, "bf16", kernel=kernel, kernels=BOTH).block_m
                    for slots in (0, 1, 8, 64, 192, 512, 1024, 8192, 65536)]
        assert block_ms == sorted(block_ms)
        assert block_ms[-1] == 128
        assert block_ms[0] == (16 if kernel == "sm80" else 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_gemm1_and_gemm2_share_block_m(arch):
    for slots, experts, hidden, inter in ((1, 8, 4096, 14336), (2048, 128, 2048, 768), (32768, 256, 7168, 2048)):
        g1 = select_config(slots, experts, 2 * inter, hidden, arch, torch.bfloat16, kernels=BOTH)
        g2 = select_config(slots, experts, hidden, inter, arch, torch.bfloat16, kernels=BOTH)
        assert g1.block_m == g2.block_m and g1.kernel == g2.kernel


@pytest.mark.parametrize("arch", ARCHS)
def test_default_configs_fit_the_sm80_kernel(arch):
    """Every config of either kernel runs on the SM80 kernel of that arch (so forcing 'sm80' never fails)."""
    for kernel in mg.kernels_for_arch(arch, BOTH):
        for cfg in mg.default_configs(kernel, arch):
            as_sm80 = dataclasses.replace(cfg, kernel="sm80")
            for gated in (False, True):
                assert mg.sm80_tile_problem(as_sm80, gated, arch) is None, (cfg, gated)


def test_select_config_returns_only_default_configs():
    for arch in ARCHS:
        for kernel in mg.kernels_for_arch(arch, BOTH):
            defaults = set(mg.default_configs(kernel, arch))
            for slots in (0, 3, 100, 1000, 10**5):
                assert select_config(slots, 16, 512, 512, arch, "fp16", kernel=kernel, kernels=BOTH) in defaults


def test_split_k_fills_one_wave_and_keeps_slices_long():
    assert mg.split_k_for(tiles=200, k=4096, block_k=64, num_sms=132) == 1   # already more than a wave
    assert mg.split_k_for(tiles=64, k=14336, block_k=64, num_sms=132) == 2   # Mixtral decode GEMM2
    assert mg.split_k_for(tiles=8, k=14336, block_k=64, num_sms=132) == 8    # capped at 8
    assert mg.split_k_for(tiles=8, k=512, block_k=64, num_sms=132) == 2     # 8 k tiles: slices of >= 4
    assert mg.split_k_for(tiles=8, k=192, block_k=64, num_sms=132) == 1
    for tiles in (1, 5, 33, 66, 131):
        s = mg.split_k_for(tiles, 1 << 16, 64, 132)
        assert s & (s - 1) == 0 and tiles * s <= 132 < tiles * s * 2 or s == 8


def test_select_config_picks_split_k_only_for_small_grids():
    mixtral_decode_gemm2 = select_config(2, 8, 4096, 14336, "90a", "bf16", kernels=BOTH, num_sms=132)
    assert mixtral_decode_gemm2.k_splits == 2
    prefill = select_config(8192, 8, 4096, 14336, "90a", "bf16", kernels=BOTH, num_sms=132)
    assert prefill.k_splits == 1
    assert select_config(2, 8, 4096, 14336, "90a", "bf16", kernels=BOTH).k_splits == 1  # no SM count: no split
    forced = select_config(8192, 8, 4096, 14336, "90a", "bf16", kernels=BOTH, num_sms=132, k_splits=4)
    assert forced.k_splits == 4
    assert dataclasses.replace(forced, k_splits=1) == prefill
    with pytest.raises(ValueError, match="k_splits"):
        select_config(2, 8, 64, 64, "90a", "bf16", kernels=BOTH, k_splits=0)
    with pytest.raises(ValueError, match="num_sms"):
        select_config(2, 8, 64, 64, "90a", "bf16", kernels=BOTH, num_sms=0)


def test_expected_tiles():
    assert mg.expected_tiles(2, 8, 4096, 64, 128) == 2 * 32           # two experts, one M block each
    assert mg.expected_tiles(8192, 8, 4096, 128, 128) == 8 * 8 * 32   # 1024 rows per expert
    assert mg.expected_tiles(0, 8, 256, 64, 128) == 2                  # no rows: still one (empty) block


def test_sm90a_takes_the_persistent_kernel_unless_a_split_is_forced():
    every = ("sm80", "sm90", "sm90ws")
    prefill = select_config(8192, 8, 4096, 14336, "90a", "bf16", kernels=every, num_sms=132)
    assert (prefill.kernel, prefill.block_m, prefill.k_splits) == ("sm90ws", 128, 1)
    for slots, experts, n, k in ((2, 8, 4096, 14336), (128, 256, 2048, 7168), (32 * 256, 256, 7168, 2048),
                                 (128, 128, 768, 2048), (0, 8, 256, 256)):
        cfg = select_config(slots, experts, n, k, "90a", "bf16", kernels=every, num_sms=132)
        assert (cfg.kernel, cfg.block_m, cfg.k_splits) == ("sm90ws", 128, 1)
    split = select_config(8192, 8, 4096, 14336, "90a", "bf16", kernels=every, k_splits=2)
    assert (split.kernel, split.k_splits) == ("sm90", 2)
    assert select_config(2, 8, 4096, 14336, "90a", "bf16", kernels=("sm80", "sm90"), num_sms=132).kernel == "sm90"
    assert select_config(8192, 8, 4096, 14336, "80", "bf16", kernels=every).kernel == "sm80"
    forced = select_config(3, 8, 256, 256, "90a", "bf16", kernel="sm90ws", kernels=every)
    assert forced.block_m == 128 and forced in mg.default_configs("sm90ws", "90a")
    with pytest.raises(ValueError, match="k_splits"):
        select_config(8192, 8, 64, 64, "90a", "bf16", kernel="sm90ws", kernels=every, k_splits=2)


def test_one_half_tiles_narrow_with_few_rows_per_expert():
    every = ("sm80", "sm90", "sm90ws")
    rows = mg._NARROW_MAX_ROWS_PER_EXPERT

    def tile(slots, gated):  # 128 experts
        cfg = select_config(slots, 128, 2048, 768, "90a", "bf16", kernels=every, num_sms=132, gated=gated)
        assert mg.smem_bytes(cfg, gated) <= mg.smem_limit("90a")
        return cfg.block_n, cfg.stages

    assert tile(128, False) == tile(rows * 128, False) == (128, 6)   # GEMM2 at 1 and 16 rows per expert
    assert tile(rows * 128 + 1, False) == (256, 3)
    assert tile(128, True) == tile(rows * 128 + 1, True) == (128, 4)  # gated GEMM1: one tile


def test_gemm1_gathers_a_only_on_sm90ws_with_many_rows_per_expert():
    limit = mg.DIRECT_A_MAX_ROWS_PER_EXPERT
    ws = select_config(64, 8, 256, 256, "90a", "bf16", kernel="sm90ws", kernels=("sm80", "sm90", "sm90ws"))
    assert not mg.gathers_a(ws, limit * 8, 8) and mg.gathers_a(ws, limit * 8 + 1, 8)
    assert not mg.gathers_a(ws, 1, 256) and mg.gathers_a(ws, 4096 * 8, 256)
    for kernel in ("sm80", "sm90"):
        cfg = select_config(4096 * 8, 8, 256, 256, "90a", "bf16", kernel=kernel, kernels=("sm80", "sm90", "sm90ws"))
        assert not mg.gathers_a(cfg, 4096 * 8, 8)  # they read x in place


def test_kernel_choice():
    assert select_config(64, 8, 256, 256, "90a", "bf16", kernels=BOTH).kernel == "sm90"
    assert select_config(64, 8, 256, 256, "90a", "bf16", kernels=("sm80",)).kernel == "sm80"
    assert select_config(64, 8, 256, 256, "90a", "bf16", kernel="sm80", kernels=BOTH).kernel == "sm80"
    for arch in ("80", "86", "90", "100a"):
        assert select_config(64, 8, 256, 256, arch, "bf16", kernels=BOTH).kernel == "sm80"
    with pytest.raises(ValueError, match="kernel"):
        select_config(64, 8, 256, 256, "80", "bf16", kernel="sm90", kernels=BOTH)


def test_select_config_is_pure_and_accepts_dtype_tags():
    a = select_config(300, 8, 256, 256, "80", torch.float16)
    b = select_config(300, 8, 256, 256, "sm_80", "fp16")
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"arch": "75"}, ValueError, "arch"),
    ({"arch": "cpu"}, ValueError, "arch"),
    ({"dtype": "fp32"}, ValueError, "dtype"),
    ({"dtype": torch.float32}, ValueError, "dtype"),
    ({"num_slots": -1}, ValueError, "num_slots"),
    ({"num_experts": 0}, ValueError, "num_experts"),
    ({"n": True}, TypeError, "n"),
    ({"k": 0}, ValueError, "k"),
])
def test_select_config_rejects(kwargs, error, match):
    args = {"num_slots": 8, "num_experts": 4, "n": 256, "k": 256, "arch": "80", "dtype": "bf16", **kwargs}
    with pytest.raises(error, match=match):
        select_config(**args)


@pytest.mark.parametrize("field, value", [("kernel", "sm70"), ("block_m", 48), ("block_n", 24), ("block_n", 512),
                                          ("block_k", 8), ("stages", 1), ("stages", 2.0)])
def test_gemm_config_validation(field, value):
    fields = {"kernel": "sm80", "block_m": 64, "block_n": 128, "block_k": 32, "stages": 4, field: value}
    with pytest.raises((ValueError, TypeError), match=f"config.{field}"):
        GemmConfig(**fields)


@pytest.mark.parametrize("kernel, cluster_m", [("sm80", 2), ("sm90", 2), ("sm90ws", 3), ("sm90ws", 0)])
def test_gemm_config_rejects_cluster_sizes_the_kernel_lacks(kernel, cluster_m):
    with pytest.raises(ValueError, match="config.cluster_m"):
        GemmConfig(kernel, 128, 128, 64, 4, cluster_m=cluster_m)


def test_sm90ws_clusters_only_gated_gemm1():
    """Gated GEMM1 (two B halves) multicasts its weight tiles over clusters of two; one-half GEMMs run alone."""
    gated = select_config(4096 * 8, 256, 2048, 7168, "90a", "bf16", num_sms=132, gated=True)
    plain = select_config(4096 * 8, 256, 7168, 2048, "90a", "bf16", num_sms=132, gated=False)
    assert (gated.kernel, gated.cluster_m, plain.kernel, plain.cluster_m) == ("sm90ws", 2, "sm90ws", 1)
    spec = mg.gemm_spec(gated, "bf16", "gemm1", "Swiglu", ("90a",))
    assert dict(spec.params)["cluster_m"] == 2 and "cluster_m2" in spec.readable_name
    assert select_config(4096, 8, 1024, 1024, "80", "bf16", gated=True).cluster_m == 1


def test_gemm_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GemmConfig("sm80", 64, 128, 32, 4).block_m = 16


# ---------------------------------------------------------------------------------------------------------------
# Specs and prewarm
def test_spec_name_sources_and_rendering():
    cfg = GemmConfig("sm80", 64, 128, 32, 4)
    spec = mg.gemm_spec(cfg, "bf16", "gemm1", "SwigluBias", ("80",))
    assert spec.readable_name.startswith("moe_gemm_sm80_bf16_SwigluBias_gemm1_block_m64_block_n128_block_k32")
    assert spec.sources == ("sm80/gemm.cu", "moe_gemm_binding.cpp") and not spec.cutlass
    text = spec.rendered_sources()["sm80/gemm.cu"]
    assert "dtype_bf16, jitmoe::dtype_bf16, Act::SwigluBias, sm80::GemmMode::gemm1, 64," in text and "$" not in text
    assert mg.gemm_spec(cfg, "fp16", "gemm2", "Identity", ("90a",)).archs == ("90a",)


@pytest.mark.parametrize("cfg, dtype, mode, act, archs", [
    (GemmConfig("sm80", 64, 128, 32, 4), "bf16", "gemm2", "Swiglu", ("80",)),      # GEMM2 takes Identity
    (GemmConfig("sm80", 64, 128, 32, 4), "fp32", "gemm1", "Swiglu", ("80",)),      # no fp32 kernel
    (GemmConfig("sm80", 64, 128, 32, 4), "bf16", "gemm3", "Swiglu", ("80",)),
    (GemmConfig("sm80", 64, 128, 32, 4), "bf16", "gemm1", "Swish", ("80",)),
    (GemmConfig("sm80", 64, 128, 32, 4), "bf16", "gemm1", "Swiglu", ("75",)),      # before SM80
    (GemmConfig("sm90", 64, 128, 64, 4), "bf16", "gemm1", "Swiglu", ("80",)),      # wgmma needs 90a
    (GemmConfig("sm80", 128, 256, 32, 2), "bf16", "gemm1", "Swiglu", ("90a",)),    # 256 accumulators / thread
    (GemmConfig("sm80", 128, 128, 64, 8), "bf16", "gemm1", "Swiglu", ("90a",)),    # shared memory
    (GemmConfig("sm80", 128, 128, 32, 4), "bf16", "gemm1", "Swiglu", ("86",)),     # 99 KiB on sm_86
])
def test_spec_rejects_unsupported(cfg, dtype, mode, act, archs):
    with pytest.raises((UnsupportedSpecError, ValueError)):
        mg.gemm_spec(cfg, dtype, mode, act, archs)


def test_activation_enum_members_are_accepted_by_name():
    from enum import IntEnum
    Act = IntEnum("ActivationType", {"Gelu": 0, "Swiglu": 3})
    assert mg.activation_name(Act.Swiglu) == "Swiglu"
    with pytest.raises(ValueError, match="activation"):
        mg.activation_name("swiglu")


def test_prewarm_covers_every_activation_at_every_default_config():
    specs = mg.PREWARM["fused_moe"](["fp32", "bf16", "fp16"], [1, 2, 8], ["80", "90a"])
    names = [s.readable_name for s in specs]
    assert len(names) == len(set(names)) and not any("fp32" in n for n in names)
    built = set()
    for s in specs:
        p = dict(s.params)
        built.add((s.archs, p["kernel"], p["dtype"], p["mode"], p["act"], p["block_m"], p["block_n"], p["block_k"],
                   p["stages"], p.get("cluster_m", 1)))
    # Every (mode, activation) at every config select_config can give it: gated GEMM1s at the two-half configs,
    # plain GEMM1s and GEMM2 at the one-half ones (wider on sm90ws).
    pairs = [("gemm1", a, a in mg.GATED_ACTIVATIONS) for a in mg.ACTIVATIONS] + [("gemm2", "Identity", False)]
    for arch in ("80", "90a"):
        for kernel in mg.kernels_for_arch(arch):
            for mode, act, gated in pairs:
                for dtype in ("bf16", "fp16"):
                    for slots in (1, 256, 4096, 65536):
                        cfg = select_config(slots, 8, 1024, 1024, arch, dtype, kernel=kernel, gated=gated)
                        assert ((arch,), kernel, dtype, mode, act, cfg.block_m, cfg.block_n, cfg.block_k,
                                cfg.stages, cfg.cluster_m) in built
    assert mg.default_configs("sm90ws", "90a", gated=False)[0].block_n == 256
    assert all(mg.smem_bytes(c, g) <= mg.smem_limit("90a") for g in (False, True)
               for c in mg.default_configs("sm90ws", "90a", gated=g))


def test_act_reference_spot_values():
    """The GEMM reference uses the layer reference's activations (apply_activation on h = [up | gate])."""
    u = torch.tensor([100.0, -3.0, 0.5])
    g = torch.tensor([100.0, 2.0, -1.0])
    ug = torch.cat([u, g])
    silu_g = torch.nn.functional.silu(g)
    one = lambda v: torch.tensor([v])  # noqa: E731 - a per-expert parameter of expert 0
    torch.testing.assert_close(apply_activation("Swiglu", ug), silu_g * u)
    torch.testing.assert_close(apply_activation("SwigluBias", ug), silu_g * u)  # default alpha 1, beta 0, no limit
    torch.testing.assert_close(apply_activation("SwigluStep", ug), silu_g.clamp(max=7) * u.clamp(-7, 7))
    torch.testing.assert_close(apply_activation("SwigluStep", ug)[0], torch.tensor(49.0))  # default limit 7
    torch.testing.assert_close(apply_activation("SwigluBias", ug, swiglu_alpha=one(2.0), swiglu_beta=one(1.0),
                                                swiglu_limit=one(1.0))[0],
                               torch.sigmoid(torch.tensor(2.0)) * 2.0)  # g, u clamped to 1: 1 * sig(2) * (1 + 1)
    torch.testing.assert_close(apply_activation("Relu2", u), torch.tensor([10000.0, 0.0, 0.25]))
    torch.testing.assert_close(apply_activation("Identity", u), u)
    torch.testing.assert_close(apply_activation("Situ", torch.cat([u, torch.zeros(3)])), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# The CPU path (reference semantics) against a per-row loop
def build_routing(ids: torch.Tensor, num_experts: int, block_m: int):
    """moe_align's layout, with one unused (-1) block after the first expert and one poisoned block past the end."""
    flat = ids.flatten()
    num_slots = flat.numel()
    rows, blocks = [], []
    for e in range(num_experts):
        slots = (flat == e).nonzero().flatten().tolist()
        n_blocks = math.ceil(len(slots) / block_m)
        rows += slots + [num_slots] * (n_blocks * block_m - len(slots))
        blocks += [e] * n_blocks
        if e == 0:
            rows += [num_slots + 3] * block_m
            blocks.append(-1)
    num_padded = len(rows)
    rows += [0] * block_m  # past num_padded: looks real, must be ignored
    blocks.append(0)
    return (torch.tensor(rows, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int32),
            torch.tensor([num_padded], dtype=torch.int32))


def row_loop_gemm1(x, fc1, sorted_ids, block_expert, num_padded, topk, act, bias, params, block_m):
    """{p: expected row} for every real row p, one row at a time."""
    rows = {}
    for p in range(int(num_padded[0])):
        s, e = int(sorted_ids[p]), int(block_expert[p // block_m])
        if not (0 <= s < x.shape[0] * topk and 0 <= e < fc1.shape[0]):
            continue
        h = fc1[e].float() @ x[s // topk].float() + (bias[e].float() if bias is not None else 0)
        rows[p] = apply_activation(act, h, expert=e, swiglu_alpha=params["alpha"], swiglu_beta=params["beta"],
                                   swiglu_limit=params["limit"])
    return rows


@pytest.mark.parametrize("act", mg.ACTIVATIONS)
def test_cpu_gemm1_matches_row_loop(act):
    tokens, topk, experts, k, n, block_m = 9, 2, 4, 24, 16, 16
    gated = act in mg.GATED_ACTIVATIONS
    ids = torch.rand(tokens, experts).topk(topk, dim=1).indices
    sorted_ids, block_expert, num_padded = build_routing(ids, experts, block_m)
    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    fc1 = torch.randn(experts, 2 * n if gated else n, k, dtype=torch.bfloat16)
    bias = torch.randn(experts, fc1.shape[1], dtype=torch.bfloat16)
    params = {"alpha": torch.rand(experts) + 0.5, "beta": torch.rand(experts), "limit": torch.rand(experts) + 1}
    out = poison_(torch.empty(sorted_ids.shape[0], n, dtype=torch.bfloat16))
    cfg = GemmConfig("sm80", block_m, 64, 64, 4)
    moe_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out=out, topk=topk, activation=act, fc1_bias=bias,
              swiglu_alpha=params["alpha"], swiglu_beta=params["beta"], swiglu_limit=params["limit"], config=cfg)
    expected = row_loop_gemm1(x, fc1, sorted_ids, block_expert, num_padded, topk, act, bias, params, block_m)
    assert len(expected) == tokens * topk
    for p in range(out.shape[0]):
        if p in expected:
            torch.testing.assert_close(out[p].float(), expected[p].to(torch.bfloat16).float())
        else:
            assert out[p].isnan().all(), f"padding row {p} was written"


def test_cpu_gemm2_matches_row_loop_and_leaves_other_rows():
    tokens, topk, experts, k, n, block_m = 7, 3, 5, 16, 24, 16
    ids = torch.rand(tokens, experts).topk(topk, dim=1).indices
    ids[0, 0] = experts + 1  # a non-local expert: its slot is in no row and must stay untouched
    sorted_ids, block_expert, num_padded = build_routing(ids, experts, block_m)
    inter = torch.randn(sorted_ids.shape[0], k, dtype=torch.float16)
    fc2 = torch.randn(experts, n, k, dtype=torch.float16)
    bias = torch.randn(experts, n, dtype=torch.float16)
    weights = torch.rand(tokens * topk)
    out = poison_(torch.empty(tokens * topk, n, dtype=torch.float16))
    moe_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, weights, out=out, fc2_bias=bias,
              config=GemmConfig("sm80", block_m, 64, 64, 4))
    seen = set()
    for p in range(int(num_padded[0])):
        s, e = int(sorted_ids[p]), int(block_expert[p // block_m])
        if 0 <= s < tokens * topk and e >= 0:
            seen.add(s)
            want = weights[s] * (fc2[e].float() @ inter[p].float() + bias[e].float())
            torch.testing.assert_close(out[s].float(), want.half().float())
    assert seen == set(range(1, tokens * topk))
    assert out[0].isnan().all()


def test_cpu_topk1_single_slot_and_no_weights():
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    fc1 = torch.randn(2, 8, 8, dtype=torch.bfloat16)
    sorted_ids, block_expert, num_padded = build_routing(torch.tensor([[1]]), 2, 16)
    cfg = GemmConfig("sm80", 16, 64, 64, 4)
    inter = poison_(torch.empty(sorted_ids.shape[0], 8, dtype=torch.bfloat16))
    moe_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out=inter, topk=1, activation="Relu", config=cfg)
    out = poison_(torch.empty(1, 8, dtype=torch.bfloat16))
    moe_gemm2(inter, fc1, sorted_ids, block_expert, num_padded, None, out=out, config=cfg)
    p = int((sorted_ids == 0).nonzero()[0])
    h = torch.relu(fc1[1].float() @ x[0].float()).bfloat16()
    torch.testing.assert_close(inter[p], h)
    torch.testing.assert_close(out[0], (fc1[1].float() @ h.float()).bfloat16())


# ---------------------------------------------------------------------------------------------------------------
# Validation errors
def _gemm1_args(act="Swiglu"):
    tokens, topk, experts, k, n = 4, 2, 3, 16, 8
    sorted_ids, block_expert, num_padded = build_routing(torch.rand(tokens, experts).topk(topk, 1).indices,
                                                         experts, 16)
    n_b = 2 * n if act in mg.GATED_ACTIVATIONS else n
    return dict(x=torch.randn(tokens, k, dtype=torch.bfloat16), fc1=torch.randn(experts, n_b, k, dtype=torch.bfloat16),
                sorted_ids=sorted_ids, block_expert=block_expert, num_padded=num_padded,
                out=torch.empty(sorted_ids.shape[0], n, dtype=torch.bfloat16), topk=topk, activation=act,
                config=GemmConfig("sm80", 16, 64, 64, 4))


def _gemm2_args():
    a = _gemm1_args()
    num_slots = a["x"].shape[0] * a["topk"]
    return dict(inter=torch.randn(a["sorted_ids"].shape[0], 8, dtype=torch.bfloat16),
                fc2=torch.randn(3, 16, 8, dtype=torch.bfloat16), sorted_ids=a["sorted_ids"],
                block_expert=a["block_expert"], num_padded=a["num_padded"], slot_weights=torch.rand(num_slots),
                out=torch.empty(num_slots, 16, dtype=torch.bfloat16), config=a["config"])


def _call1(a):
    a = dict(a)
    positional = [a.pop(k) for k in ("x", "fc1", "sorted_ids", "block_expert", "num_padded")]
    return moe_gemm1(*positional, **a)


def _call2(a):
    a = dict(a)
    positional = [a.pop(k) for k in ("inter", "fc2", "sorted_ids", "block_expert", "num_padded", "slot_weights")]
    return moe_gemm2(*positional, **a)


GEMM1_ERRORS = [
    ("x", lambda a: a["x"].float(), TypeError),
    ("x", lambda a: a["x"][None], ValueError),
    ("x", lambda a: a["x"].t(), ValueError),  # 2-D but not contiguous (and the wrong shape)
    ("fc1", lambda a: a["fc1"].half(), TypeError),
    ("fc1", lambda a: a["fc1"][:, :, :8], ValueError),
    ("fc1", lambda a: a["fc1"][:, :15], ValueError),  # gated needs an even number of rows
    ("out", lambda a: a["out"][:-16], ValueError),
    ("out", lambda a: a["out"].half(), TypeError),
    ("sorted_ids", lambda a: a["sorted_ids"].long(), TypeError),
    ("sorted_ids", lambda a: a["sorted_ids"][:-1], ValueError),
    ("block_expert", lambda a: a["block_expert"][:-1], ValueError),
    ("num_padded", lambda a: torch.zeros(2, dtype=torch.int32), ValueError),
    ("topk", lambda a: 0, ValueError),
    ("topk", lambda a: 2.0, TypeError),
    ("activation", lambda a: "Swish", ValueError),
    ("config", lambda a: {"block_m": 16}, TypeError),
    ("fc1_bias", lambda a: torch.zeros(3, 8, dtype=torch.bfloat16), ValueError),
    ("swiglu_alpha", lambda a: torch.ones(2), ValueError),
    ("swiglu_limit", lambda a: torch.ones(3, dtype=torch.float64), TypeError),
]


@pytest.mark.parametrize("name, make, error", GEMM1_ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(GEMM1_ERRORS)])
def test_gemm1_errors_name_the_argument(name, make, error):
    a = _gemm1_args()
    a[name] = make(a)
    with pytest.raises(error, match=re.escape(name) if name != "x" else r"\bx\b"):
        _call1(a)


def test_gemm1_k_and_n_must_be_multiples_of_8():
    a = _gemm1_args("Relu")
    a["x"], a["fc1"] = a["x"][:, :12].contiguous(), a["fc1"][:, :, :12].contiguous()
    with pytest.raises(ValueError, match="multiple of 8"):
        _call1(a)
    a = _gemm1_args("Relu")
    a["fc1"], a["out"] = a["fc1"][:, :6].contiguous(), a["out"][:, :6].contiguous()
    with pytest.raises(ValueError, match="multiple of 8"):
        _call1(a)


GEMM2_ERRORS = [
    ("inter", lambda a: a["inter"][:-1], ValueError),
    ("fc2", lambda a: a["fc2"][:, :, :4], ValueError),
    ("out", lambda a: a["out"][:, :8], ValueError),
    ("slot_weights", lambda a: a["slot_weights"][:-1], ValueError),
    ("slot_weights", lambda a: a["slot_weights"].half(), TypeError),
    ("fc2_bias", lambda a: torch.zeros(3, 16, dtype=torch.float16), TypeError),
    ("block_expert", lambda a: a["block_expert"].long(), TypeError),
]


@pytest.mark.parametrize("name, make, error", GEMM2_ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(GEMM2_ERRORS)])
def test_gemm2_errors_name_the_argument(name, make, error):
    a = _gemm2_args()
    a[name] = make(a)
    with pytest.raises(error, match=name):
        _call2(a)


def test_valid_argument_sets_pass():
    _call1(_gemm1_args())
    _call2(_gemm2_args())


def test_ops_pass_opcheck():
    """Schema (out is mutated), fake impl and the dispatcher agree, on the CPU path."""
    a = _gemm1_args()
    c = a["config"]
    torch.library.opcheck(torch.ops.jitmoe.moe_gemm1.default,
                          (a["x"], a["fc1"], a["sorted_ids"], a["block_expert"], a["num_padded"], a["out"], a["topk"],
                           "Swiglu", None, None, None, None, None, c.kernel, c.block_m, c.block_n, c.block_k, c.stages,
                           1, 1))
    b = _gemm2_args()
    torch.library.opcheck(torch.ops.jitmoe.moe_gemm2.default,
                          (b["inter"], b["fc2"], b["sorted_ids"], b["block_expert"], b["num_padded"],
                           b["slot_weights"], b["out"], None, c.kernel, c.block_m, c.block_n, c.block_k, c.stages, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# nvcc -c of the SM80 template (the lead's CI runs this: two compiles)
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("mode, act", [("gemm1", "Swiglu"), ("gemm2", "Identity")])
def test_sm80_template_compiles_without_spills(mode, act, tmp_path, monkeypatch):
    monkeypatch.delenv("JITMOE_DEBUG", raising=False)
    cfg = select_config(4096, 8, 1024, 1024, "80", "bf16", kernel="sm80")
    results = compile_cuda_sources(mg.gemm_spec(cfg, "bf16", mode, act, ("80",)), tmp_path, ptxas_verbose=True)
    assert [r.source for r in results] == ["sm80/gemm.cu"]
    output = results[0].output
    assert "registers" in output, output
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
    assert spills and not any(spills), output


def test_gemm2_overlaps_gemm1_only_on_unsplit_sm90ws_pairs_with_few_waves(monkeypatch):
    ws, ws2 = GemmConfig("sm90ws", 128, 128, 64, 4, cluster_m=2), GemmConfig("sm90ws", 128, 256, 64, 3)
    few = dict(num_slots=128, num_experts=64, inter=1024, num_sms=132)    # OLMoE T = 16: 64 x 8 tiles, 3.9 waves
    many = dict(num_slots=32768, num_experts=64, inter=1024, num_sms=132)  # T = 4096: 64 x 4 x 8 tiles, 15.5 waves
    assert mg.overlaps_gemm2(ws, ws2, **few)
    assert not mg.overlaps_gemm2(ws, ws2, **many)
    assert mg.overlaps_gemm2(ws, ws2, **dict(many, num_sms=4 * 132))  # the same tiles on a larger GPU: 3.9 waves
    assert not mg.overlaps_gemm2(GemmConfig("sm90", 128, 128, 64, 4), ws2, **few)
    assert not mg.overlaps_gemm2(ws, GemmConfig("sm80", 128, 128, 32, 4), **few)
    assert not mg.overlaps_gemm2(ws, dataclasses.replace(ws2, k_splits=2), **few)
    monkeypatch.setenv("JITMOE_BLOCK_DONE", "0")
    assert not mg.overlaps_gemm2(ws, ws2, **few)
    monkeypatch.setenv("JITMOE_BLOCK_DONE", "1")
    assert mg.overlaps_gemm2(ws, ws2, **many)
    assert not mg.overlaps_gemm2(ws, dataclasses.replace(ws2, k_splits=2), **many)
