"""The persistent warp-specialised SM90 grouped GEMM ('sm90ws') against the float32 torch reference.

Specs are built and called directly (KernelSpec + load_module + the binding's ``run``), routings come from the real
moe_align kernel, and every output is poisoned first. Cases: 1 to 256 experts with empty experts, 0 to ~600 rows
per expert (never a multiple of BLOCK_M), N and K tails, gated and plain GEMM1, with and without bias, GEMM1 with A
gathered into a_sorted and with direct rows (no a_sorted: each row loaded from x), slots of non-local experts that
GEMM2 must leave untouched, the kernel's own argument errors, GEMM2 waiting on GEMM1's per-block completion counters
instead of on GEMM1's end, and CUDA-graph replays with new routing and new data.
"""
from __future__ import annotations

import math

import pytest
import torch

from jitmoe.jit import KernelSpec, load_module
from jitmoe.ops import permute
from jitmoe.ops.moe_gemm import (DIRECT_A_MAX_ROWS_PER_EXPERT, GATED_ACTIVATIONS, SM90WS_CLUSTER_M, gemm1_reference,
                                 gemm2_reference)
from jitmoe.testing import capture_graph, poison_, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                       reason="the sm90ws kernel needs an sm_90 device"),
]

TOL = 1e-2        # the SM90 tests' tolerance: bf16 outputs rounded on both sides
BLOCK_M = 128
SENTINEL = 3.0e4  # GEMM2 rows that must not be written
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
GEMM1_GATED = dict(block_n=128, stages=4)
GEMM1_PLAIN = dict(block_n=256, stages=3)
GEMM2_WIDE = dict(block_n=256, stages=3)
GEMM2_NARROW = dict(block_n=128, stages=6)


def module(dtype, act, mode, block_n, stages, cluster_m=None):
    if cluster_m is None:  # the default of a GEMM with this many B halves
        cluster_m = SM90WS_CLUSTER_M[mode == "gemm1" and act in GATED_ACTIVATIONS]
    params = {"kernel": "sm90ws", "dtype": DTYPES[dtype], "operand": DTYPES[dtype], "weight": DTYPES[dtype],
              "act": act, "mode": mode, "block_m": BLOCK_M, "block_n": block_n, "block_k": 64, "stages": stages,
              "cluster_m": cluster_m}
    spec = KernelSpec.create("moe_gemm", "moe", ("sm90ws/gemm.cu", "moe_gemm_binding.cpp"), params, ("90a",),
                             cutlass=True)
    return load_module(spec)


def align(ids: torch.Tensor, num_local: int, offset: int = 0):
    """(sorted_ids, block_expert, num_padded) from the moe_align kernel; ids int32 [T, k] on the GPU."""
    outputs = permute.empty_align_outputs(ids.numel(), num_local, BLOCK_M, ids.device)
    permute.align_into(ids, num_local, BLOCK_M, offset, outputs)
    return outputs[:3]


def random_ids(tokens, topk, num_experts, *, skew=False):
    """[T, k] distinct experts per token; skew concentrates tokens on few experts so others stay empty."""
    scores = torch.rand(tokens, num_experts, device="cuda")
    if skew:
        scores[:, : max(1, num_experts // 8)] += 1.0
    return scores.topk(topk, dim=1).indices.to(torch.int32)


def counted_ids(counts):
    """[T, 1] ids giving expert e exactly counts[e] rows, in a shuffled token order."""
    ids = torch.repeat_interleave(torch.arange(len(counts), device="cuda"), torch.tensor(counts, device="cuda"))
    return ids[torch.randperm(ids.numel(), device="cuda")].to(torch.int32).unsqueeze(1)


def weights(num_experts, rows, k, dtype):
    return (torch.randn(num_experts, rows, k, device="cuda") / math.sqrt(k)).to(dtype)


def real_rows(sorted_ids, num_padded, num_slots):
    """Sorted positions p < num_padded that hold a real slot."""
    p = torch.arange(sorted_ids.numel(), device=sorted_ids.device)
    return ((p < num_padded) & (sorted_ids >= 0) & (sorted_ids < num_slots)).nonzero().flatten()


def stale_slot_rows(num_slots, m_pad_max):
    """The gather's inverse-map scratch as a previous call may leave it: arbitrary rows, many of them in range."""
    return torch.randint(-1, m_pad_max, (num_slots,), dtype=torch.int32, device="cuda")


def run_gemm1(mod, x, fc1, bias, routing, inter, topk, a_sorted, params=(None, None, None), k_splits=1,
              slot_rows=None, slot_rows_filled=False, block_done=None):
    """slot_rows_filled: slot_rows holds what moe_align wrote (the launch skips its own inversion); block_done: the
    per-block completion counters to count stored tiles in."""
    sorted_ids, block_expert, num_padded = routing
    num_slots = x.shape[0] * topk
    if slot_rows is None and a_sorted is not None:
        slot_rows = stale_slot_rows(num_slots, sorted_ids.numel())
    mod.run(x, fc1, bias, inter, sorted_ids, block_expert, num_padded, None, *params, num_slots, topk,
            inter.shape[1], x.shape[1], None, a_sorted, slot_rows, slot_rows_filled, k_splits, None, None, None,
            block_done, 0)


def run_gemm2(mod, inter, fc2, bias, routing, out, slot_weights, k_splits=1, block_done=None, gemm1_n_blocks=0):
    """block_done: wait for GEMM1's count of gemm1_n_blocks tiles per A block (not for the launch before to end)."""
    sorted_ids, block_expert, num_padded = routing
    mod.run(inter, fc2, bias, out, sorted_ids, block_expert, num_padded, slot_weights, None, None, None,
            out.shape[0], 1, out.shape[1], inter.shape[1], None, None, None, False, k_splits, None, None, None,
            block_done, gemm1_n_blocks)


# ---------------------------------------------------------------------------------------------------------------
def check_gemm1(tokens, experts, topk, hidden, inter_size, act, dtype, *, bias=True, params=None, skew=False,
                cluster_m=None, ids=None, direct=False):
    """direct: no a_sorted, so the kernel loads every A row straight from x."""
    gated = act in GATED_ACTIVATIONS
    tile = GEMM1_GATED if gated else GEMM1_PLAIN
    mod = module(dtype, act, "gemm1", **tile, cluster_m=cluster_m)
    ids = random_ids(tokens, topk, experts, skew=skew) if ids is None else ids
    routing = align(ids, experts)
    m_pad_max = routing[0].numel()
    n_b = 2 * inter_size if gated else inter_size
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    fc1 = weights(experts, n_b, hidden, dtype)
    b1 = (0.5 * torch.randn(experts, n_b, device="cuda")).to(dtype) if bias else None
    params = params or {}
    act_params = tuple(params.get(k) for k in ("alpha", "beta", "limit"))
    inter = poison_(torch.empty(m_pad_max, inter_size, dtype=dtype, device="cuda"))
    a_sorted = None if direct else poison_(torch.empty(m_pad_max, hidden, dtype=dtype, device="cuda"))  # NaN pads
    run_gemm1(mod, x, fc1, b1, routing, inter, topk, a_sorted, act_params)
    ref = poison_(torch.empty_like(inter))
    gemm1_reference(x, fc1, *routing, ref, topk, act, b1, *act_params, BLOCK_M)
    rows = real_rows(routing[0], routing[2], tokens * topk)
    assert rows.numel() == tokens * topk
    err = rel_error(inter[rows], ref[rows])
    assert err <= TOL, f"{act} {dtype} T={tokens} E={experts} k={topk} H={hidden} I={inter_size} {direct=}: {err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 64, 64),          # one row, one expert, K and N below one tile
    (600, 1, 1, 520, 200),      # one expert, 600 rows: 5 blocks, the last partial; K and N tails
    (1000, 8, 4, 264, 136),     # ~500 rows per expert
    (300, 64, 8, 1032, 392),    # ~37 rows per expert, some experts empty
    (40, 256, 8, 136, 264),     # 320 slots over 256 experts: most empty, one row each
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("direct", [False, True], ids=["gathered", "direct"])
def test_gemm1_swiglu_shapes(shape, dtype, bias, direct):
    check_gemm1(*shape, "Swiglu", dtype, bias=bias, direct=direct)


@pytest.mark.parametrize("cluster_m", [1, 2])
def test_gemm1_tile_orders(cluster_m):
    """GEMM1 walks its units N fastest when a row of N blocks fits half the clusters, else in raster groups of M
    blocks: an N of 8 blocks and one of more blocks than any GPU's clusters / 2 take the two orders."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    wide = 128 * (sms // (2 * cluster_m) + 2)  # block_n 128: more N blocks than half the clusters
    for inter_size in (8 * 128, wide + 40):
        check_gemm1(700, 8, 2, 136, inter_size, "Swiglu", torch.bfloat16, cluster_m=cluster_m)


@pytest.mark.parametrize("cluster_m", [1, 2])
def test_raster_groups_follow_expert_boundaries(cluster_m):
    """Raster groups start at 8 M blocks and grow, up to 16, until an expert starts: with experts of 0 to 17 blocks
    the groups are 16 (cut at the cap inside the first expert), 8 (ended where an expert starts) and 5 (the last
    blocks); with clusters of two, 8, 4 and 3 M groups. Through GEMM1 in raster order (more N blocks than half the
    clusters) and through GEMM2."""
    counts = [2100, 100, 300, 0, 129, 1, 17, 33, 257]
    ids = counted_ids(counts)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    wide = 128 * (sms // (2 * cluster_m) + 2)
    check_gemm1(ids.shape[0], len(counts), 1, 136, wide + 40, "Swiglu", torch.bfloat16, cluster_m=cluster_m, ids=ids)
    check_gemm2(ids.shape[0], len(counts), 1, 264, 136, torch.bfloat16, GEMM2_WIDE, cluster_m=cluster_m, ids=ids)


def test_gather_of_rows_shorter_than_a_warp():
    """The gather with fewer 16-byte chunks per row of x than lanes (hidden 136: 17 chunks; 72: 9) over many
    tokens: every lane must reach the warp's shuffles. Lanes without a chunk once skipped them, and this routing
    (6795 slots at top-1) hung the warp on every H100 run."""
    ids = counted_ids([700, 1, 1030, 260, 129, 1500, 0, 385, 640, 17, 2100, 33])
    for hidden in (136, 72):
        check_gemm1(ids.shape[0], 12, 1, hidden, 264, "Swiglu", torch.bfloat16, ids=ids)


@pytest.mark.parametrize("shape", [(1000, 8, 4, 264, 136), (300, 64, 8, 1032, 392), (40, 256, 8, 136, 520)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm1_gelu_plain_tile(shape, bias):
    check_gemm1(*shape, "Gelu", torch.bfloat16, bias=bias)
    check_gemm1(*shape, "Gelu", torch.bfloat16, bias=bias, direct=True)


def test_gemm1_skewed_routing_leaves_experts_empty():
    check_gemm1(700, 64, 2, 256, 328, "Swiglu", torch.bfloat16, skew=True)


def test_gemm1_per_expert_activation_parameters():
    e = 8
    params = {"alpha": 1 + torch.rand(e, device="cuda"), "beta": 0.5 + torch.rand(e, device="cuda"),
              "limit": 0.5 + 1.5 * torch.rand(e, device="cuda")}
    check_gemm1(333, e, 2, 392, 200, "SwigluBias", torch.bfloat16, params=params)


@pytest.mark.parametrize("cluster_m", [1, 2])
def test_row_groups_of_every_size(cluster_m):
    """Only the 16-row groups of A that hold a real row are loaded (and GEMM1 stores only those): experts with
    row counts on both sides of every group, half-block and block boundary, all in one launch, through both GEMMs
    with padding rows poisoned. Direct rows get the same blocks: every lane's share of rows, up to a full block."""
    counts = [1, 15, 16, 17, 31, 33, 47, 63, 64, 65, 80, 113, 127, 128, 129, 144, 191, 255, 256, 257]
    ids = counted_ids(counts)
    for direct in (False, True):
        check_gemm1(ids.shape[0], len(counts), 1, 264, 136, "Swiglu", torch.bfloat16, cluster_m=cluster_m, ids=ids,
                    direct=direct)
    check_gemm2(ids.shape[0], len(counts), 1, 264, 136, torch.bfloat16, GEMM2_WIDE, cluster_m=cluster_m, ids=ids)


# ---------------------------------------------------------------------------------------------------------------
def check_gemm2(tokens, local, topk, hidden, inter_size, dtype, tile, *, bias=True, slot_weights=True,
                total_experts=None, cluster_m=None, ids=None):
    mod = module(dtype, "Identity", "gemm2", **tile, cluster_m=cluster_m)
    ids = random_ids(tokens, topk, total_experts or local) if ids is None else ids
    routing = align(ids, local)  # ids >= local belong to other ranks: their slots are dropped
    sorted_ids, _, num_padded = routing
    num_slots = tokens * topk
    rows = real_rows(sorted_ids, num_padded, num_slots)
    inter = poison_(torch.empty(sorted_ids.numel(), inter_size, dtype=dtype, device="cuda"))
    inter[rows] = torch.randn(rows.numel(), inter_size, device="cuda").to(dtype)
    fc2 = weights(local, hidden, inter_size, dtype)
    b2 = (0.5 * torch.randn(local, hidden, device="cuda")).to(dtype) if bias else None
    w = torch.rand(num_slots, device="cuda") if slot_weights else None
    buf = torch.full((num_slots + 4, hidden), SENTINEL, dtype=dtype, device="cuda")  # 4 spare rows past the view
    slots = sorted_ids[rows].long()
    buf[slots] = float("nan")
    snapshot = buf.clone()
    out = buf[:num_slots]
    run_gemm2(mod, inter, fc2, b2, routing, out, w)
    ref = torch.zeros(num_slots, hidden, dtype=dtype, device="cuda")
    gemm2_reference(inter, fc2, *routing, w, ref, b2, BLOCK_M)
    err = rel_error(out[slots], ref[slots])
    assert err <= TOL, f"{dtype} T={tokens} E={local} k={topk} H={hidden} I={inter_size} {tile}: {err}"
    untouched = torch.ones(buf.shape[0], dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(buf[untouched], snapshot[untouched]), "rows without a real slot were written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64, 64), (600, 1, 1, 200, 520), (1000, 8, 4, 136, 264),
                                   (300, 64, 8, 392, 1032), (40, 256, 8, 264, 136)])
@pytest.mark.parametrize("tile", [GEMM2_WIDE, GEMM2_NARROW], ids=["bn256", "bn128"])
def test_gemm2_shapes(shape, dtype, tile):
    check_gemm2(*shape, dtype, tile)


@pytest.mark.parametrize("tile", [GEMM2_WIDE, GEMM2_NARROW], ids=["bn256", "bn128"])
def test_gemm2_in_clusters_of_two(tile):
    """Both GEMM2 tiles multicasting the weight tile to clusters of two (autotune candidates)."""
    for shape in [(600, 1, 1, 200, 520), (1000, 8, 4, 136, 264), (700, 64, 8, 264, 136)]:
        check_gemm2(*shape, torch.bfloat16, tile, cluster_m=2)


@pytest.mark.parametrize("bias, slot_weights", [(False, True), (True, False)])
def test_gemm2_bias_and_weight_options(bias, slot_weights):
    check_gemm2(500, 8, 2, 328, 200, torch.bfloat16, GEMM2_WIDE, bias=bias, slot_weights=slot_weights)


def test_gemm2_never_writes_dropped_slots():
    check_gemm2(200, 8, 2, 256, 264, torch.bfloat16, GEMM2_WIDE, total_experts=32)


@pytest.mark.parametrize("shape", [(600, 1, 1, 520, 200), (1000, 8, 4, 264, 136), (300, 64, 8, 1032, 392)])
def test_kernel_with_the_other_cluster_size(shape):
    """The cluster size each default does not use (1 or 2 CTAs sharing each weight tile by multicast) computes the
    same tiles: odd M-block counts, neighbouring blocks of different experts, CTAs without a tile in a unit."""
    for direct in (False, True):
        check_gemm1(*shape, "Swiglu", torch.bfloat16, cluster_m=3 - SM90WS_CLUSTER_M[True], direct=direct)
    tokens, experts, topk, hidden, inter_size = shape
    check_gemm2(tokens, experts, topk, inter_size, hidden, torch.bfloat16, GEMM2_WIDE,
                cluster_m=3 - SM90WS_CLUSTER_M[False])


# ---------------------------------------------------------------------------------------------------------------
def test_kernel_rejects_split_k():
    mod = module(torch.bfloat16, "Identity", "gemm2", **GEMM2_WIDE)
    routing = align(random_ids(8, 2, 4), 4)
    inter = torch.zeros(routing[0].numel(), 64, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(16, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="k_splits"):
        run_gemm2(mod, inter, weights(4, 64, 64, torch.bfloat16), None, routing, out, None, k_splits=2)


def test_gemm1_gather_requires_slot_rows():
    mod = module(torch.bfloat16, "Swiglu", "gemm1", **GEMM1_GATED)
    sorted_ids, block_expert, num_padded = align(random_ids(8, 2, 4), 4)
    x = torch.zeros(8, 64, dtype=torch.bfloat16, device="cuda")
    inter = torch.zeros(sorted_ids.numel(), 64, dtype=torch.bfloat16, device="cuda")
    a_sorted = torch.zeros(sorted_ids.numel(), 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="slot_rows"):
        mod.run(x, weights(4, 128, 64, torch.bfloat16), None, inter, sorted_ids, block_expert, num_padded, None,
                None, None, None, 16, 2, 64, 64, None, a_sorted, None, False, 1, None, None, None, None, 0)


def test_gemm2_with_counters_needs_gemm1_n_blocks():
    mod = module(torch.bfloat16, "Identity", "gemm2", **GEMM2_WIDE)
    routing = align(random_ids(8, 2, 4), 4)
    inter = torch.zeros(routing[0].numel(), 64, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(16, 64, dtype=torch.bfloat16, device="cuda")
    counters = torch.zeros(routing[1].numel(), dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="block_done_n_blocks"):
        run_gemm2(mod, inter, weights(4, 64, 64, torch.bfloat16), None, routing, out, None, block_done=counters)


# ---------------------------------------------------------------------------------------------------------------
# Per-block completion counters: GEMM2 starts on GEMM1's finished M blocks while GEMM1 still runs (with PDL).
@pytest.mark.parametrize("cluster_m", [1, 2])
@pytest.mark.parametrize("shape", [(16, 64, 8, 1024, 512), (300, 64, 8, 1032, 392), (2000, 8, 2, 520, 1032)],
                         ids=["direct", "gathered", "long-experts"])
def test_gemm2_on_counted_blocks_gives_the_serial_bits(shape, cluster_m):
    """align (zeroing the counters) -> GEMM1 counting -> GEMM2 waiting per block, three times over, against the same
    launches without counters: the same bits; GEMM1 counts every consumer warp of every tile of a used block."""
    tokens, experts, topk, hidden, inter_size = shape
    dtype = torch.bfloat16
    g1 = module(dtype, "Swiglu", "gemm1", **GEMM1_GATED, cluster_m=cluster_m)
    g2 = module(dtype, "Identity", "gemm2", **GEMM2_NARROW)
    ids = random_ids(tokens, topk, experts, skew=True)
    routing = permute.empty_align_outputs(ids.numel(), experts, BLOCK_M, ids.device)
    m_pad_max = routing[0].numel()
    direct = tokens * topk <= DIRECT_A_MAX_ROWS_PER_EXPERT * experts  # as the pipeline decides
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    fc1, fc2 = weights(experts, 2 * inter_size, hidden, dtype), weights(experts, hidden, inter_size, dtype)
    w = torch.rand(tokens * topk, device="cuda")
    inter = torch.empty(m_pad_max, inter_size, dtype=dtype, device="cuda")
    a_sorted = None if direct else torch.empty(m_pad_max, hidden, dtype=dtype, device="cuda")
    slot_rows = None if direct else torch.empty(tokens * topk, dtype=torch.int32, device="cuda")
    counters = torch.full((routing[1].numel(),), -7, dtype=torch.int32, device="cuda")  # align must zero them
    n_blocks1 = -(-inter_size // GEMM1_GATED["block_n"])

    def layer(block_done):
        out = poison_(torch.empty(tokens * topk, hidden, dtype=dtype, device="cuda"))
        poison_(inter)
        permute.align_into(ids, experts, BLOCK_M, 0, routing, slot_rows=slot_rows, block_done=block_done)
        three = tuple(routing[:3])
        run_gemm1(g1, x, fc1, None, three, inter, topk, a_sorted, slot_rows=slot_rows, slot_rows_filled=not direct,
                  block_done=block_done)
        run_gemm2(g2, inter, fc2, None, three, out, w, block_done=block_done,
                  gemm1_n_blocks=n_blocks1 if block_done is not None else 0)
        return out

    serial = layer(None)
    for _ in range(3):
        assert torch.equal(layer(counters), serial)
    used = routing[1] >= 0
    assert used.any()
    assert (counters[used] == 8 * n_blocks1).all(), counters  # two consumer warpgroups of four warps
    assert (counters[~used] == 0).all()
    ref = torch.zeros_like(serial)
    gemm2_reference(inter, fc2, *routing[:3], w, ref, None, BLOCK_M)
    assert rel_error(serial, ref) <= TOL


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counted", [False, True], ids=["serial", "counted"])
@pytest.mark.parametrize("direct", [False, True], ids=["gathered", "direct"])
def test_cuda_graph_replay_with_new_routing_and_data(direct, counted):
    """counted: GEMM2 waits on GEMM1's per-block counters (zeroed by the replayed moe_align)."""
    tokens, experts, topk, hidden, inter_size, dtype = 700, 16, 4, 392, 264, torch.bfloat16
    g1 = module(dtype, "Swiglu", "gemm1", **GEMM1_GATED)
    g2 = module(dtype, "Identity", "gemm2", **GEMM2_WIDE)
    ids = random_ids(tokens, topk, experts)
    routing = permute.empty_align_outputs(ids.numel(), experts, BLOCK_M, ids.device)
    m_pad_max = routing[0].numel()
    t = dict(x=torch.randn(tokens, hidden, device="cuda").to(dtype),
             fc1=weights(experts, 2 * inter_size, hidden, dtype),
             fc2=weights(experts, hidden, inter_size, dtype),
             b1=(0.5 * torch.randn(experts, 2 * inter_size, device="cuda")).to(dtype),
             b2=(0.5 * torch.randn(experts, hidden, device="cuda")).to(dtype),
             w=torch.rand(tokens * topk, device="cuda"))
    inter = torch.empty(m_pad_max, inter_size, dtype=dtype, device="cuda")
    a_sorted = None if direct else torch.empty(m_pad_max, hidden, dtype=dtype, device="cuda")
    slot_rows = None if direct else stale_slot_rows(tokens * topk, m_pad_max)
    out = torch.empty(tokens * topk, hidden, dtype=dtype, device="cuda")
    counters = torch.empty(routing[1].numel(), dtype=torch.int32, device="cuda") if counted else None
    n_blocks1 = -(-inter_size // GEMM1_GATED["block_n"]) if counted else 0

    def pipeline():  # moe_align writes slot_rows for the gather, as in the fused pipeline
        permute.align_into(ids, experts, BLOCK_M, 0, routing, slot_rows=slot_rows, block_done=counters)
        three = tuple(routing[:3])
        run_gemm1(g1, t["x"], t["fc1"], t["b1"], three, inter, topk, a_sorted, slot_rows=slot_rows,
                  slot_rows_filled=not direct, block_done=counters)
        run_gemm2(g2, inter, t["fc2"], t["b2"], three, out, t["w"], block_done=counters, gemm1_n_blocks=n_blocks1)

    graph = capture_graph(pipeline)
    ids.copy_(random_ids(tokens, topk, experts, skew=True))
    for name, value in t.items():
        value.copy_(torch.randn_like(value.float()).to(value.dtype) if name != "w" else torch.rand_like(value))
    t["fc1"].div_(math.sqrt(hidden))
    t["fc2"].div_(math.sqrt(inter_size))
    for buffer in (inter, a_sorted, out):
        if buffer is not None:
            poison_(buffer)
    graph.replay()
    torch.cuda.synchronize()

    fresh = align(ids, experts)
    ref_inter = poison_(torch.empty_like(inter))
    gemm1_reference(t["x"], t["fc1"], *fresh, ref_inter, topk, "Swiglu", t["b1"], None, None, None, BLOCK_M)
    rows = real_rows(fresh[0], fresh[2], tokens * topk)
    assert torch.equal(routing[0], fresh[0]), "the replayed moe_align saw other ids"
    assert rel_error(inter[rows], ref_inter[rows]) <= TOL
    ref_out = torch.zeros_like(out)
    gemm2_reference(inter, t["fc2"], *fresh, t["w"], ref_out, t["b2"], BLOCK_M)
    assert rel_error(out, ref_out) <= TOL
