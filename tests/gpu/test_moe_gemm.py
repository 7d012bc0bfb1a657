"""Grouped GEMMs of the fused-MoE pipeline (moe_gemm1 / moe_gemm2) on every kernel this GPU runs ('sm80' always,
'sm90' on sm_90a when its template exists) against a float32 torch computation (the CPU reference path).

Routings are built the way moe_align lays them out, with the awkward cases on purpose: padding rows, an empty
expert, an unused (-1) block inside num_padded, a tail past num_padded that looks real (valid slots, expert 0) and
must be ignored, slots of non-local experts (EP) that must stay untouched, T*k = 1, K and N tails.
Configs come from select_config, so every module the tests need is in `jitmoe prewarm --op fused_moe`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from jitmoe.jit import device_archs
from jitmoe.ops import moe_gemm as mg
from jitmoe.testing import poison_, rel_error

pytestmark = pytest.mark.gpu

TOL = 1e-2
KERNELS = mg.KERNELS
DTYPES = (torch.bfloat16, torch.float16)


def _arch() -> str:
    return device_archs(torch.device("cuda"))[0]


def _config(kernel: str, num_slots: int, num_experts: int, n: int, k: int, dtype) -> mg.GemmConfig:
    if kernel not in mg.kernels_for_arch(_arch()):
        pytest.skip(f"the {kernel} kernel does not run on sm_{_arch()} (or its template is missing)")
    return mg.select_config(num_slots, num_experts, n, k, _arch(), dtype, kernel=kernel)


# ---------------------------------------------------------------------------------------------------------------
# Routing in the sorted, padded layout of moe_gemm_args.cuh
@dataclass
class Routing:
    sorted_ids: torch.Tensor    # int32 [m_pad_max] (cuda)
    block_expert: torch.Tensor  # int32 [m_pad_max / block_m] (cuda)
    num_padded: torch.Tensor    # int32 [1] (cuda)
    positions: torch.Tensor     # int64 [R] sorted positions of the real rows (cpu)
    slots: torch.Tensor         # int64 [R] their slots (cpu)
    dropped: torch.Tensor       # int64 slots of non-local experts: in no row (cpu)
    num_slots: int


def random_ids(tokens: int, topk: int, num_experts: int) -> torch.Tensor:
    """[T, k] distinct experts per token; expert 1 is never chosen (an empty expert) when there are enough."""
    scores = torch.rand(tokens, num_experts)
    if num_experts - 1 >= topk + 1:
        scores[:, 1] = -1.0
    return scores.topk(topk, dim=1).indices


def build_routing(ids: torch.Tensor, local_experts: int, block_m: int, *, tail_blocks: int = 1) -> Routing:
    flat = ids.flatten()
    num_slots = flat.numel()
    rows, blocks = [], []
    for e in range(local_experts):
        slots = (flat == e).nonzero().flatten().tolist()
        n_blocks = math.ceil(len(slots) / block_m)
        rows += slots + [num_slots] * (n_blocks * block_m - len(slots))
        blocks += [e] * n_blocks
        if n_blocks and len(blocks) == n_blocks:  # after the first non-empty expert: an unused block
            rows += [num_slots + 7] * block_m
            blocks.append(-1)
    num_padded = len(rows)
    for _ in range(tail_blocks):  # past num_padded: valid-looking slots of expert 0, never to be touched
        rows += [i % max(num_slots, 1) for i in range(block_m)]
        blocks.append(0)
    sorted_ids = torch.tensor(rows, dtype=torch.int32)
    real = (sorted_ids[:num_padded] >= 0) & (sorted_ids[:num_padded] < num_slots)
    positions = real.nonzero().flatten()
    dropped = torch.tensor(sorted(set(range(num_slots)) - set(sorted_ids[positions].tolist())), dtype=torch.long)
    return Routing(sorted_ids.cuda(), torch.tensor(blocks, dtype=torch.int32).cuda(),
                   torch.tensor([num_padded], dtype=torch.int32).cuda(), positions,
                   sorted_ids[positions].long(), dropped, num_slots)


def _cpu(t):
    return None if t is None else t.detach().float().cpu()


def reference_gemm1(x, fc1, r: Routing, topk, act, bias, params, block_m) -> torch.Tensor:
    n = fc1.shape[1] // 2 if act in mg.GATED_ACTIVATIONS else fc1.shape[1]
    out = torch.full((r.sorted_ids.shape[0], n), float("nan"))
    mg.gemm1_reference(_cpu(x), _cpu(fc1), r.sorted_ids.cpu(), r.block_expert.cpu(), r.num_padded.cpu(), out, topk,
                       act, _cpu(bias), *(_cpu(params.get(k)) for k in ("swiglu_alpha", "swiglu_beta", "swiglu_limit")),
                       block_m)
    return out


def reference_gemm2(inter, fc2, r: Routing, weights, bias, block_m) -> torch.Tensor:
    out = torch.full((r.num_slots, fc2.shape[1]), float("nan"))
    mg.gemm2_reference(_cpu(inter), _cpu(fc2), r.sorted_ids.cpu(), r.block_expert.cpu(), r.num_padded.cpu(),
                       _cpu(weights), out, _cpu(bias), block_m)
    return out


def weights(experts, rows, k, dtype, scale=1.0):
    return (torch.randn(experts, rows, k, device="cuda") * (scale / k ** 0.5)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("act", mg.ACTIVATIONS)
def test_gemm1_every_activation(kernel, act):
    tokens, topk, experts, k, n, dtype = 37, 2, 6, 136, 200, torch.bfloat16
    cfg = _config(kernel, tokens * topk, experts, n, k, dtype)
    gated = act in mg.GATED_ACTIVATIONS
    r = build_routing(random_ids(tokens, topk, experts), experts, cfg.block_m)
    x = torch.randn(tokens, k, device="cuda").to(dtype)
    # SwigluStep runs with its default limit (7) and large pre-activations so the clamps matter.
    fc1 = weights(experts, 2 * n if gated else n, k, dtype, scale=6.0 if act == "SwigluStep" else 1.0)
    bias = (0.5 * torch.randn(experts, fc1.shape[1], device="cuda")).to(dtype)
    params = {}
    if act == "SwigluBias":
        params = {"swiglu_alpha": torch.rand(experts, device="cuda") + 0.5,
                  "swiglu_beta": torch.rand(experts, device="cuda"),
                  "swiglu_limit": torch.rand(experts, device="cuda") + 0.5}
    out = poison_(torch.empty(r.sorted_ids.shape[0], n, dtype=dtype, device="cuda"))
    mg.moe_gemm1(x, fc1, r.sorted_ids, r.block_expert, r.num_padded, out=out, topk=topk, activation=act,
                 fc1_bias=bias, config=cfg, **params)
    ref = reference_gemm1(x, fc1, r, topk, act, bias, params, cfg.block_m)
    assert rel_error(out[r.positions.cuda()], ref[r.positions]) <= TOL


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm2_scatters_weighted_rows_and_leaves_the_rest(kernel, dtype):
    tokens, topk, total_experts, local_experts, k, n = 45, 3, 10, 7, 200, 136
    cfg = _config(kernel, tokens * topk, local_experts, n, k, dtype)
    r = build_routing(random_ids(tokens, topk, total_experts), local_experts, cfg.block_m)
    assert r.dropped.numel() > 0
    inter = torch.randn(r.sorted_ids.shape[0], k, device="cuda").to(dtype)
    pad = torch.ones(inter.shape[0], dtype=torch.bool)
    pad[r.positions] = False
    inter[pad.cuda()] = float("nan")  # padding rows must never reach a real output
    fc2 = weights(local_experts, n, k, dtype)
    bias = torch.randn(local_experts, n, device="cuda").to(dtype)
    slot_weights = torch.rand(r.num_slots, device="cuda")
    out = poison_(torch.empty(r.num_slots, n, dtype=dtype, device="cuda"))
    mg.moe_gemm2(inter, fc2, r.sorted_ids, r.block_expert, r.num_padded, slot_weights, out=out, fc2_bias=bias,
                 config=cfg)
    ref = reference_gemm2(inter, fc2, r, slot_weights, bias, cfg.block_m)
    assert rel_error(out[r.slots.cuda()], ref[r.slots]) <= TOL
    assert out[r.dropped.cuda()].isnan().all(), "slots without a local expert were written"


# (tokens, topk, experts): T*k = 1, decode, and rows per expert reaching every block_m tier of both kernels.
SHAPES = [(1, 1, 4), (16, 2, 8), (96, 2, 3), (200, 4, 6), (700, 2, 4)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, topk, experts", SHAPES)
def test_gemm1_then_gemm2_at_every_tier(kernel, dtype, tokens, topk, experts):
    hidden, inter_size = 264, 200  # K and N tails in both GEMMs
    cfg = _config(kernel, tokens * topk, experts, hidden, inter_size, dtype)
    r = build_routing(random_ids(tokens, topk, experts), experts, cfg.block_m, tail_blocks=2)
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    fc1, fc2 = weights(experts, 2 * inter_size, hidden, dtype), weights(experts, hidden, inter_size, dtype)
    b1 = (0.5 * torch.randn(experts, 2 * inter_size, device="cuda")).to(dtype)
    b2 = torch.randn(experts, hidden, device="cuda").to(dtype)
    slot_weights = torch.rand(r.num_slots, device="cuda")
    inter = poison_(torch.empty(r.sorted_ids.shape[0], inter_size, dtype=dtype, device="cuda"))
    out = poison_(torch.empty(r.num_slots, hidden, dtype=dtype, device="cuda"))
    mg.moe_gemm1(x, fc1, r.sorted_ids, r.block_expert, r.num_padded, out=inter, topk=topk, fc1_bias=b1, config=cfg)
    mg.moe_gemm2(inter, fc2, r.sorted_ids, r.block_expert, r.num_padded, slot_weights, out=out, fc2_bias=b2,
                 config=cfg)
    ref_inter = reference_gemm1(x, fc1, r, topk, "Swiglu", b1, {}, cfg.block_m)
    assert rel_error(inter[r.positions.cuda()], ref_inter[r.positions]) <= TOL
    ref = reference_gemm2(ref_inter, fc2, r, slot_weights, b2, cfg.block_m)
    assert rel_error(out, ref) <= TOL  # every slot is real here: no NaN may be left


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k_splits", [2, 3, 8])
@pytest.mark.parametrize("act", ["Swiglu", "Gelu", "SwigluBias"])
def test_split_k_matches_reference_and_skips_padding(kernel, k_splits, act):
    if kernel not in mg.SPLIT_K_KERNELS:
        pytest.skip(f"the {kernel} kernel does not split K")
    # K = 264: 5 k tiles of 64 (or 9 of 32), so 8 slices leave some empty; EP-dropped slots must stay untouched.
    tokens, topk, total_experts, local_experts, hidden, inter_size, dtype = 21, 3, 9, 6, 264, 200, torch.float16
    cfg = dataclasses.replace(_config(kernel, tokens * topk, local_experts, inter_size, hidden, dtype),
                              k_splits=k_splits)
    r = build_routing(random_ids(tokens, topk, total_experts), local_experts, cfg.block_m, tail_blocks=2)
    gated = act in mg.GATED_ACTIVATIONS
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    fc1 = weights(local_experts, 2 * inter_size if gated else inter_size, hidden, dtype)
    fc2 = weights(local_experts, hidden, inter_size, dtype)
    b1 = (0.5 * torch.randn(local_experts, fc1.shape[1], device="cuda")).to(dtype)
    b2 = torch.randn(local_experts, hidden, device="cuda").to(dtype)
    params = {"swiglu_alpha": torch.rand(local_experts, device="cuda") + 0.5,
              "swiglu_limit": torch.rand(local_experts, device="cuda") + 0.5} if act == "SwigluBias" else {}
    slot_weights = torch.rand(r.num_slots, device="cuda")
    inter = poison_(torch.empty(r.sorted_ids.shape[0], inter_size, dtype=dtype, device="cuda"))
    out = poison_(torch.empty(r.num_slots, hidden, dtype=dtype, device="cuda"))
    mg.moe_gemm1(x, fc1, r.sorted_ids, r.block_expert, r.num_padded, out=inter, topk=topk, activation=act,
                 fc1_bias=b1, config=cfg, **params)
    mg.moe_gemm2(inter, fc2, r.sorted_ids, r.block_expert, r.num_padded, slot_weights, out=out, fc2_bias=b2,
                 config=cfg)
    ref_inter = reference_gemm1(x, fc1, r, topk, act, b1, params, cfg.block_m)
    assert rel_error(inter[r.positions.cuda()], ref_inter[r.positions]) <= TOL
    ref = reference_gemm2(ref_inter, fc2, r, slot_weights, b2, cfg.block_m)
    assert rel_error(out[r.slots.cuda()], ref[r.slots]) <= TOL
    assert out[r.dropped.cuda()].isnan().all(), "slots without a local expert were written"


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_rows_writes_nothing(kernel):
    dtype, k, n, experts = torch.bfloat16, 64, 64, 4
    cfg = _config(kernel, 0, experts, n, k, dtype)
    for tokens, local in ((0, experts), (3, 0)):  # T = 0; every expert non-local (num_padded = 0)
        ids = random_ids(tokens, 2, experts)
        r = build_routing(ids, local, cfg.block_m)
        x = torch.randn(tokens, k, device="cuda").to(dtype)
        inter = poison_(torch.empty(r.sorted_ids.shape[0], n, dtype=dtype, device="cuda"))
        out = poison_(torch.empty(r.num_slots, n, dtype=dtype, device="cuda"))
        mg.moe_gemm1(x, weights(experts, 2 * n, k, dtype), r.sorted_ids, r.block_expert, r.num_padded, out=inter,
                     topk=2, config=cfg)
        mg.moe_gemm2(inter, weights(experts, n, n, dtype), r.sorted_ids, r.block_expert, r.num_padded, None,
                     out=out, config=cfg)
        torch.cuda.synchronize()
        assert inter.isnan().all() and out.isnan().all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_graph_replay_follows_new_routing(kernel):
    tokens, topk, experts, k, n, dtype = 64, 2, 8, 128, 192, torch.bfloat16
    cfg = _config(kernel, tokens * topk, experts, n, k, dtype)
    x = torch.randn(tokens, k, device="cuda").to(dtype)
    fc1, fc2 = weights(experts, 2 * n, k, dtype), weights(experts, k, n, dtype)
    slot_weights = torch.rand(tokens * topk, device="cuda")
    # Room for any routing: per-expert padding, the unused block and the tail block build_routing adds.
    m_pad_max = (math.ceil(tokens * topk / cfg.block_m) + experts + 2) * cfg.block_m
    sorted_ids = torch.full((m_pad_max,), tokens * topk, dtype=torch.int32, device="cuda")
    block_expert = torch.full((m_pad_max // cfg.block_m,), -1, dtype=torch.int32, device="cuda")
    num_padded = torch.zeros(1, dtype=torch.int32, device="cuda")
    inter = torch.empty(m_pad_max, n, dtype=dtype, device="cuda")
    out = torch.empty(tokens * topk, k, dtype=dtype, device="cuda")

    def layer():
        mg.moe_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out=inter, topk=topk, config=cfg)
        mg.moe_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out=out, config=cfg)

    def load(r: Routing):
        sorted_ids.fill_(tokens * topk)
        block_expert.fill_(-1)
        sorted_ids[:r.sorted_ids.shape[0]].copy_(r.sorted_ids)
        block_expert[:r.block_expert.shape[0]].copy_(r.block_expert)
        num_padded.copy_(r.num_padded)

    load(build_routing(random_ids(tokens, topk, experts), experts, cfg.block_m))
    layer()  # warm: build/load the modules outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer()
    for _ in range(2):
        r = build_routing(random_ids(tokens, topk, experts), experts, cfg.block_m)
        load(r)
        poison_(inter)
        poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        ref_inter = reference_gemm1(x, fc1, r, topk, "Swiglu", None, {}, cfg.block_m)
        ref = reference_gemm2(ref_inter, fc2, r, slot_weights, None, cfg.block_m)
        assert rel_error(out, ref) <= TOL


@pytest.mark.parametrize("kernel", KERNELS)
def test_two_runs_are_bitwise_equal(kernel):
    tokens, topk, experts, k, n, dtype = 300, 2, 4, 256, 256, torch.float16
    cfg = _config(kernel, tokens * topk, experts, n, k, dtype)
    r = build_routing(random_ids(tokens, topk, experts), experts, cfg.block_m)
    x = torch.randn(tokens, k, device="cuda").to(dtype)
    fc1, fc2 = weights(experts, 2 * n, k, dtype), weights(experts, k, n, dtype)
    slot_weights = torch.rand(r.num_slots, device="cuda")
    results = []
    for _ in range(2):
        inter = poison_(torch.empty(r.sorted_ids.shape[0], n, dtype=dtype, device="cuda"))
        out = poison_(torch.empty(r.num_slots, k, dtype=dtype, device="cuda"))
        mg.moe_gemm1(x, fc1, r.sorted_ids, r.block_expert, r.num_padded, out=inter, topk=topk, config=cfg)
        mg.moe_gemm2(inter, fc2, r.sorted_ids, r.block_expert, r.num_padded, slot_weights, out=out, config=cfg)
        results.append(out)
    assert torch.equal(results[0], results[1])


def test_misaligned_pointer_is_rejected():
    dtype, k, n, experts = torch.bfloat16, 64, 64, 4
    cfg = _config("sm80", 8, experts, n, k, dtype)
    r = build_routing(random_ids(4, 2, experts), experts, cfg.block_m)
    x = torch.randn(4 * k + 4, device="cuda").to(dtype)[4:].view(4, k)  # 8-byte offset
    out = torch.empty(r.sorted_ids.shape[0], n, dtype=dtype, device="cuda")
    with pytest.raises(ValueError, match="x: expected a 16-byte aligned"):
        mg.moe_gemm1(x, weights(experts, 2 * n, k, dtype), r.sorted_ids, r.block_expert, r.num_padded, out=out,
                     topk=2, config=cfg)


def test_tensors_on_different_devices_are_rejected():
    dtype, k, n, experts = torch.bfloat16, 64, 64, 4
    cfg = _config("sm80", 8, experts, n, k, dtype)
    r = build_routing(random_ids(4, 2, experts), experts, cfg.block_m)
    x = torch.randn(4, k, device="cuda").to(dtype)
    out = torch.empty(r.sorted_ids.shape[0], n, dtype=dtype, device="cuda")
    with pytest.raises(ValueError, match="fc1: expected a tensor on cuda"):
        mg.moe_gemm1(x, weights(experts, 2 * n, k, dtype).cpu(), r.sorted_ids, r.block_expert, r.num_padded,
                     out=out, topk=2, config=cfg)
