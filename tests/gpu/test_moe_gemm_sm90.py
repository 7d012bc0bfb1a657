"""SM90 (wgmma) grouped GEMMs of the fused-MoE pipeline against a float32 torch computation.

Routings are built here the way moe_align lays them out (expert-sorted, padded per expert to BLOCK_M), with the
awkward cases on purpose: padding rows, empty experts, an unused (-1) block inside num_padded, a poisoned tail past
num_padded that must never be read, slots of non-local experts that are dropped (EP), T*k = 1, K and N tails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from jitmoe.ops.moe_gemm import GemmConfig, moe_gemm1, moe_gemm2
from jitmoe.testing import poison_, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                       reason="the SM90 kernels need an sm_90 device"),
]

GATED = {"Swiglu", "Geglu", "GegluTanh", "SwigluBias", "SwigluStep", "Situ"}
ACTIVATIONS = ["Swiglu", "Geglu", "GegluTanh", "SwigluBias", "SwigluStep", "Situ", "Relu2", "Gelu", "Relu", "Silu",
               "Identity"]
INT_SENTINEL = -0x5A5A5A5  # what poison_ writes into int tensors
TOL = 1e-2


def _config(block_m=128, block_n=128, block_k=64, stages=4):
    return GemmConfig(kernel="sm90", block_m=block_m, block_n=block_n, block_k=block_k, stages=stages)


PRIMARY = dict(block_m=128, block_n=128, block_k=64, stages=4)
ALT_GEMM1 = [dict(block_m=64, block_n=128, block_k=64, stages=4), dict(block_m=64, block_n=64, block_k=128, stages=3)]
ALT_GEMM2 = [dict(block_m=64, block_n=128, block_k=64, stages=4), dict(block_m=128, block_n=256, block_k=64, stages=3)]


# ---------------------------------------------------------------------------------------------------------------
# Routing in the sorted, padded layout of moe_gemm_args.cuh
@dataclass
class Routing:
    sorted_ids: torch.Tensor    # int32 [m_pad_max]
    block_expert: torch.Tensor  # int32 [m_pad_max / block_m]
    num_padded: torch.Tensor    # int32 [1]
    positions: torch.Tensor     # int64 [R] sorted positions p of the real rows
    slots: torch.Tensor         # int64 [R] slot of each real row
    experts: torch.Tensor       # int64 [R] local expert of each real row
    dropped: torch.Tensor       # int64 slots that are in no row (non-local experts)
    num_slots: int
    topk: int


def random_ids(tokens: int, topk: int, num_experts: int) -> torch.Tensor:
    """[T, k] distinct experts per token, uniformly random."""
    return torch.rand(tokens, num_experts).topk(topk, dim=1).indices


def build_routing(ids: torch.Tensor, local_experts: int, block_m: int, device, *, capacity_blocks: int = 0) -> Routing:
    """Experts >= local_experts are non-local: their slots are dropped. One unused block (-1) follows the first
    expert; one poisoned block (or up to capacity_blocks) follows num_padded."""
    topk, flat = ids.shape[1], ids.flatten()
    num_slots = flat.numel()
    rows, blocks = [], []
    for e in range(local_experts):
        slots = (flat == e).nonzero().flatten().tolist()
        if not slots:
            continue  # empty expert: no block at all
        n_blocks = math.ceil(len(slots) / block_m)
        rows += slots + [num_slots] * (n_blocks * block_m - len(slots))
        blocks += [e] * n_blocks
        if len(blocks) == n_blocks:  # after the first expert: an unused block of padding rows
            rows += [num_slots] * block_m
            blocks.append(-1)
    num_padded = len(rows)
    tail = max(1, capacity_blocks - len(blocks))
    rows += [INT_SENTINEL] * (tail * block_m)
    blocks += [INT_SENTINEL] * tail
    sorted_ids = torch.tensor(rows, dtype=torch.int32)
    real = (sorted_ids[:num_padded] >= 0) & (sorted_ids[:num_padded] < num_slots)
    positions = real.nonzero().flatten()
    slots = sorted_ids[positions].long()
    experts = torch.tensor(blocks, dtype=torch.int64)[positions // block_m]
    dropped = (flat >= local_experts).nonzero().flatten()
    return Routing(sorted_ids.to(device), torch.tensor(blocks, dtype=torch.int32, device=device),
                   torch.tensor([num_padded], dtype=torch.int32, device=device),
                   positions, slots, experts, dropped, num_slots, topk)


# ---------------------------------------------------------------------------------------------------------------
# float32 references
def act_ref(name: str, h: torch.Tensor, n: int, alpha, beta, limit) -> torch.Tensor:
    """Activation of activation.cuh on fc1 outputs h [R, n_b] (gated: [up | gate]); alpha/beta/limit are [R]."""
    up, gate = (h[:, :n], h[:, n:]) if name in GATED else (h, None)
    alpha, beta, limit = alpha[:, None], beta[:, None], limit[:, None]
    if name == "Swiglu":
        return F.silu(gate) * up
    if name == "Geglu":
        return F.gelu(gate) * up
    if name == "GegluTanh":
        return F.gelu(gate, approximate="tanh") * up
    if name == "SwigluBias":
        g = torch.minimum(gate, limit)
        return g * torch.sigmoid(alpha * g) * (torch.clamp(up, -limit, limit) + beta)
    if name == "SwigluStep":
        return torch.minimum(F.silu(gate), limit) * torch.clamp(up, -limit, limit)
    if name == "Situ":
        return 4 * torch.tanh(gate / 4) * torch.sigmoid(gate) * (25 * torch.tanh(up / 25))
    return {"Relu2": lambda v: F.relu(v) ** 2, "Gelu": F.gelu, "Relu": F.relu, "Silu": F.silu,
            "Identity": lambda v: v}[name](up)


def grouped_matmul(a: torch.Tensor, experts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row r of the result is a[r] @ w[experts[r]]^T, in float32 (one matmul per expert)."""
    out = torch.empty(a.shape[0], w.shape[1], device=a.device)
    for e in experts.unique().tolist():
        rows = experts == e
        out[rows] = a[rows].float() @ w[e].float().t()
    return out


def gemm1_ref(x, fc1, bias, r: Routing, act: str, n: int, params=None) -> torch.Tensor:
    """[R, N] expected inter rows, in the order of r.positions. params: the swiglu_* tensors given (None: defaults)."""
    experts = r.experts.to(x.device)
    h = grouped_matmul(x[(r.slots // r.topk).to(x.device)], experts, fc1)
    if bias is not None:
        h = h + bias.float()[experts]
    params = params or {}
    defaults = {"swiglu_alpha": 1.0, "swiglu_beta": 0.0, "swiglu_limit": 7.0 if act == "SwigluStep" else math.inf}
    per_row = [params[k].to(x.device)[experts] if params.get(k) is not None else torch.full_like(h[:, 0], v)
               for k, v in defaults.items()]
    return act_ref(act, h, n, *per_row)


def gemm2_ref(inter, fc2, bias, weights, r: Routing) -> torch.Tensor:
    """[R, H] expected out_slots rows, in the order of r.slots."""
    experts = r.experts.to(inter.device)
    h = grouped_matmul(inter[r.positions.to(inter.device)], experts, fc2)
    if bias is not None:
        h = h + bias.float()[experts]
    return h * weights[r.slots.to(inter.device)][:, None]


# ---------------------------------------------------------------------------------------------------------------
def _weights(num_experts, rows, k, dtype):
    return (torch.randn(num_experts, rows, k, device="cuda") / math.sqrt(k)).to(dtype)


def run_gemm1(r: Routing, x, fc1, n, act, cfg, *, bias=None, params=None):
    inter = poison_(torch.empty(r.sorted_ids.numel(), n, dtype=x.dtype, device="cuda"))
    params = {k: v.cuda() for k, v in (params or {}).items() if v is not None}
    moe_gemm1(x, fc1, r.sorted_ids, r.block_expert, r.num_padded, out=inter, topk=r.topk, activation=act,
              fc1_bias=bias, config=cfg, **params)
    return inter


def check_gemm1(tokens, local_experts, topk, hidden, inter_size, act, dtype, cfg_kw, *, bias=True, params=None,
                total_experts=None):
    cfg = _config(**cfg_kw)
    ids = random_ids(tokens, topk, total_experts or local_experts)
    r = build_routing(ids, local_experts, cfg.block_m, "cuda")
    n_b = 2 * inter_size if act in GATED else inter_size
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    fc1 = _weights(local_experts, n_b, hidden, dtype)
    b1 = (0.5 * torch.randn(local_experts, n_b, device="cuda")).to(dtype) if bias else None
    inter = run_gemm1(r, x, fc1, inter_size, act, cfg, bias=b1, params=params)
    got = inter[r.positions.cuda()]
    ref = gemm1_ref(x, fc1, b1, r, act, inter_size, params)
    assert got.shape == ref.shape
    err = rel_error(got, ref)
    assert err <= TOL, f"{act} {dtype} T={tokens} E={local_experts} k={topk} H={hidden} I={inter_size}: {err}"


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gemm1_every_activation_with_tails(act):
    params = None  # per-expert parameters that really clamp
    if act == "SwigluBias":
        params = {"swiglu_alpha": 1 + torch.rand(6), "swiglu_beta": 0.5 + torch.rand(6),
                  "swiglu_limit": 0.5 + 1.5 * torch.rand(6)}
    elif act == "SwigluStep":
        params = {"swiglu_limit": 0.2 + 0.5 * torch.rand(6)}
    check_gemm1(45, 6, 2, 136, 200, act, torch.bfloat16, PRIMARY, params=params)


@pytest.mark.parametrize("act", ["SwigluBias", "SwigluStep"])
def test_gemm1_default_activation_parameters(act):
    check_gemm1(33, 4, 2, 128, 96, act, torch.bfloat16, PRIMARY)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4, 1, 136, 200), (37, 64, 4, 128, 64), (300, 8, 2, 1024, 256),
                                   (1024, 16, 4, 256, 384), (17, 3, 2, 264, 136)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm1_shapes(shape, dtype, bias):
    check_gemm1(*shape, "Swiglu", dtype, PRIMARY, bias=bias)


def test_gemm1_drops_non_local_experts():
    check_gemm1(64, 4, 2, 256, 128, "Swiglu", torch.bfloat16, PRIMARY, total_experts=16)


@pytest.mark.parametrize("cfg_kw", ALT_GEMM1)
@pytest.mark.parametrize("act", ["Swiglu", "Gelu"])
def test_gemm1_tile_configs(cfg_kw, act):
    check_gemm1(200, 8, 2, 392, 328, act, torch.bfloat16, cfg_kw)


# ---------------------------------------------------------------------------------------------------------------
def run_gemm2(r: Routing, inter, fc2, weights, cfg, *, bias=None, spare_rows=4):
    """Returns (out_slots, buffer, snapshot): out_slots is a view of the first num_slots rows of a larger buffer
    whose other rows, and the rows of dropped slots, must come back untouched."""
    h = fc2.shape[1]
    buf = torch.full((r.num_slots + spare_rows, h), 3.0e4, dtype=inter.dtype, device="cuda")
    buf[r.slots.cuda()] = float("nan")  # the real rows: poisoned
    snapshot = buf.clone()
    out = buf[: r.num_slots]
    moe_gemm2(inter, fc2, r.sorted_ids, r.block_expert, r.num_padded, weights, out=out, fc2_bias=bias, config=cfg)
    return out, buf, snapshot


def check_gemm2(tokens, local_experts, topk, hidden, inter_size, dtype, cfg_kw, *, bias=True, total_experts=None,
                slot_weights=True):
    cfg = _config(**cfg_kw)
    ids = random_ids(tokens, topk, total_experts or local_experts)
    r = build_routing(ids, local_experts, cfg.block_m, "cuda")
    inter = poison_(torch.empty(r.sorted_ids.numel(), inter_size, dtype=dtype, device="cuda"))
    inter[r.positions.cuda()] = torch.randn(r.positions.numel(), inter_size, device="cuda").to(dtype)
    fc2 = _weights(local_experts, hidden, inter_size, dtype)
    b2 = (0.5 * torch.randn(local_experts, hidden, device="cuda")).to(dtype) if bias else None
    weights = torch.rand(r.num_slots, device="cuda") if slot_weights else None
    out, buf, snapshot = run_gemm2(r, inter, fc2, weights, cfg, bias=b2)
    ref = gemm2_ref(inter, fc2, b2, torch.ones(r.num_slots, device="cuda") if weights is None else weights, r)
    err = rel_error(out[r.slots.cuda()], ref)
    assert err <= TOL, f"{dtype} T={tokens} E={local_experts} k={topk} H={hidden} I={inter_size}: {err}"
    untouched = torch.ones(buf.shape[0], dtype=torch.bool)
    untouched[r.slots] = False
    assert untouched[r.dropped].all()
    assert torch.equal(buf[untouched.cuda()], snapshot[untouched.cuda()]), "rows without a real slot were written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4, 1, 200, 136), (45, 6, 2, 200, 136), (37, 64, 4, 64, 128),
                                   (300, 8, 2, 256, 1024), (1024, 16, 4, 384, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm2_shapes(shape, dtype, bias):
    check_gemm2(*shape, dtype, PRIMARY, bias=bias)


def test_gemm2_never_writes_dropped_slots():
    check_gemm2(64, 4, 2, 128, 256, torch.bfloat16, PRIMARY, total_experts=16)


def test_gemm2_without_slot_weights_scales_by_one():
    check_gemm2(50, 4, 2, 136, 200, torch.bfloat16, PRIMARY, slot_weights=False)


@pytest.mark.parametrize("cfg_kw", ALT_GEMM2)
def test_gemm2_tile_configs(cfg_kw):
    check_gemm2(200, 8, 2, 328, 392, torch.bfloat16, cfg_kw)


# ---------------------------------------------------------------------------------------------------------------
def _pipeline_inputs(tokens=96, experts=8, topk=2, hidden=256, inter_size=192, dtype=torch.bfloat16):
    return dict(x=torch.randn(tokens, hidden, device="cuda").to(dtype),
                fc1=_weights(experts, 2 * inter_size, hidden, dtype), fc2=_weights(experts, hidden, inter_size, dtype),
                b1=(0.5 * torch.randn(experts, 2 * inter_size, device="cuda")).to(dtype),
                b2=(0.5 * torch.randn(experts, hidden, device="cuda")).to(dtype),
                weights=torch.rand(tokens * topk, device="cuda"), ids=random_ids(tokens, topk, experts))


def _run_pipeline(t, r: Routing, inter, out, cfg):
    moe_gemm1(t["x"], t["fc1"], r.sorted_ids, r.block_expert, r.num_padded, out=inter, topk=r.topk,
              activation="Swiglu", fc1_bias=t["b1"], config=cfg)
    moe_gemm2(inter, t["fc2"], r.sorted_ids, r.block_expert, r.num_padded, t["weights"], out=out,
              fc2_bias=t["b2"], config=cfg)


def _pipeline_ref(t, r: Routing, inter_size):
    inter = gemm1_ref(t["x"], t["fc1"], t["b1"], r, "Swiglu", inter_size).to(t["x"].dtype)
    full = torch.zeros(r.sorted_ids.numel(), inter_size, dtype=inter.dtype, device="cuda")
    full[r.positions.cuda()] = inter
    return gemm2_ref(full, t["fc2"], t["b2"], t["weights"], r)


def test_two_runs_are_bitwise_equal():
    cfg = _config(**PRIMARY)
    t = _pipeline_inputs()
    r = build_routing(t["ids"], 8, cfg.block_m, "cuda")
    results = []
    for _ in range(2):
        inter = poison_(torch.empty(r.sorted_ids.numel(), 192, dtype=torch.bfloat16, device="cuda"))
        out = poison_(torch.empty(r.num_slots, 256, dtype=torch.bfloat16, device="cuda"))
        _run_pipeline(t, r, inter, out, cfg)
        results.append(out[r.slots.cuda()].clone())
    assert torch.equal(results[0], results[1])


def test_cuda_graph_capture_and_replay_with_new_routing():
    cfg = _config(**PRIMARY)
    t = _pipeline_inputs()
    capacity = math.ceil(t["ids"].numel() / cfg.block_m) + 8 + 2  # every expert's padding, the -1 block, a tail
    r = build_routing(t["ids"], 8, cfg.block_m, "cuda", capacity_blocks=capacity)
    inter = torch.empty(r.sorted_ids.numel(), 192, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(r.num_slots, 256, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run_pipeline(t, r, inter, out, cfg)  # builds and loads the modules outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_pipeline(t, r, inter, out, cfg)

    fresh = _pipeline_inputs()
    r2 = build_routing(fresh["ids"], 8, cfg.block_m, "cuda", capacity_blocks=capacity)
    assert r2.sorted_ids.numel() == r.sorted_ids.numel()
    for name in ("x", "fc1", "fc2", "b1", "b2", "weights"):
        t[name].copy_(fresh[name])
    for name in ("sorted_ids", "block_expert", "num_padded"):
        getattr(r, name).copy_(getattr(r2, name))
    poison_(inter)
    poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out[r2.slots.cuda()], _pipeline_ref(t, r2, 192)) <= TOL
