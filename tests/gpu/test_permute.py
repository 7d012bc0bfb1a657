"""moe_align and moe_combine on the device: exact agreement with the reference (both are deterministic), poisoned
outputs, EP offsets and invalid ids, E up to 8192, CUDA-graph capture; both moe_align kernels (one CTA below
MULTI_CTA_MIN_SLOTS slots, many CTAs above), their boundary, a million slots, and the many-CTA kernel's sync words
(zero after every call, per stream, fresh inside a graph)."""
import pytest
import torch

import jitmoe
from jitmoe.ops import permute as pm
from jitmoe.reference.moe import moe_align_reference, moe_combine_reference, slot_rows_reference
from jitmoe.testing import poison_

pytestmark = pytest.mark.gpu


def random_ids(T, k, num_experts_total, invalid_fraction=0.0, device="cuda"):
    ids = torch.randint(0, num_experts_total, (T, k), dtype=torch.int32, device=device)
    if invalid_fraction:
        bad = torch.rand(T, k, device=device) < invalid_fraction
        junk = torch.where(torch.rand(T, k, device=device) < 0.5, -1 - ids, ids + num_experts_total)
        ids = torch.where(bad, junk, ids)
    return ids


def align_poisoned(ids, num_local, block_m, offset, slot_rows=None):
    outputs = pm.empty_align_outputs(ids.numel(), num_local, block_m, ids.device)
    for t in outputs:
        poison_(t)
    pm.align_into(ids, num_local, block_m, offset, outputs, slot_rows=slot_rows)
    return outputs


def assert_same(outputs, expected):
    names = ("sorted_ids", "block_expert", "num_padded", "expert_counts")
    for name, got, want in zip(names, outputs, expected):
        assert torch.equal(got.cpu(), want.cpu()), name


ALIGN_CASES = [  # (T, k, local experts, ep_size, block_m, invalid fraction)
    (0, 2, 8, 1, 16, 0.0), (1, 1, 1, 1, 16, 0.0), (1, 8, 256, 1, 64, 0.0), (2, 8, 256, 1, 16, 0.1),
    (16, 4, 64, 4, 64, 0.0), (127, 4, 64, 4, 64, 0.05), (100, 2, 3, 1, 1, 0.0), (1024, 8, 128, 1, 128, 0.0),
    (8192, 8, 256, 1, 128, 0.01), (8192, 8, 4096, 1, 64, 0.0), (4096, 8, 4096, 2, 16, 0.0),
    (16, 8, 8192, 1, 32, 0.0), (3000, 1, 2, 1, 128, 0.0), (65536, 2, 16, 1, 64, 0.0),
]


@pytest.mark.parametrize("T,k,num_local,ep_size,block_m,invalid", ALIGN_CASES)
def test_align_matches_reference(T, k, num_local, ep_size, block_m, invalid):
    ids = random_ids(T, k, num_local * ep_size, invalid)
    for rank in sorted({0, ep_size - 1}):
        offset = rank * num_local
        slot_rows = poison_(torch.empty(ids.numel(), dtype=torch.int32, device=ids.device))
        got = align_poisoned(ids, num_local, block_m, offset, slot_rows=slot_rows)
        assert_same(got, moe_align_reference(ids.cpu(), num_local, block_m, offset))
        assert torch.equal(slot_rows.cpu(), slot_rows_reference(got[0].cpu(), ids.numel())), "slot_rows"
        assert_same(jitmoe.moe_align(ids, num_local, block_m, offset), got)


def test_align_all_slots_on_one_expert_and_repeatable():
    ids = torch.full((8192, 8), 5, dtype=torch.int32, device="cuda")
    ids[::7, 3] = 2
    first = align_poisoned(ids, 8, 16, 0)
    assert_same(first, moe_align_reference(ids.cpu(), 8, 16, 0))
    assert_same(align_poisoned(ids, 8, 16, 0), first)


BIG_ALIGN_CASES = [  # (T, k, local experts, ep_size, block_m, invalid fraction): the many-CTA kernel
    (4096, 8, 128, 1, 128, 0.0), (4096, 8, 64, 1, 64, 0.01), (4096, 8, 256, 1, 128, 0.0), (1024, 8, 128, 1, 64, 0.0),
    (2047, 1, 8, 1, 16, 0.0), (2048, 1, 8, 1, 16, 0.0), (2049, 1, 8, 1, 16, 0.2), (683, 3, 5, 1, 1, 0.0),
    (16384, 8, 4096, 2, 128, 0.05), (65536, 16, 4096, 1, 64, 0.0), (131072, 8, 256, 1, 128, 0.0),
    (8191, 8, 8192, 1, 32, 0.0), (100000, 1, 1, 1, 128, 0.5), (5000, 8, 160, 8, 16, 0.0), (3000, 2, 3, 1, 1024, 0.0),
]


@pytest.mark.parametrize("T,k,num_local,ep_size,block_m,invalid", BIG_ALIGN_CASES)
def test_align_many_slots_matches_reference(T, k, num_local, ep_size, block_m, invalid):
    ids = random_ids(T, k, num_local * ep_size, invalid)
    for rank in sorted({0, ep_size // 2, ep_size - 1}):
        offset = rank * num_local
        got = align_poisoned(ids, num_local, block_m, offset)
        assert_same(got, moe_align_reference(ids.cpu(), num_local, block_m, offset))
    assert not pm._sync_words(ids.device).any()  # the last CTA zeroed the words for the next call


@pytest.mark.parametrize("T,k", [(8192, 8), (131072, 8)])
def test_align_many_slots_on_one_expert_with_empty_experts(T, k):
    ids = torch.full((T, k), 37, dtype=torch.int32, device="cuda")
    ids[::3, 2] = 3
    ids[::11, 5] = 200  # beyond the local experts
    for _ in range(3):  # repeated calls reuse the stream's sync words
        assert_same(align_poisoned(ids, 64, 128, 0), moe_align_reference(ids.cpu(), 64, 128, 0))


def test_align_many_slots_on_two_streams_at_once():
    streams = [torch.cuda.Stream() for _ in range(2)]
    cases = [(random_ids(8192, 8, 128), 128, 128), (random_ids(6000, 4, 512, 0.1), 512, 16)]
    outputs = [pm.empty_align_outputs(ids.numel(), e, bm, ids.device) for ids, e, bm in cases]
    torch.cuda.synchronize()
    for _ in range(5):
        for stream, (ids, e, bm), out in zip(streams, cases, outputs):
            with torch.cuda.stream(stream):
                pm.align_into(ids, e, bm, 0, out)
    torch.cuda.synchronize()
    for (ids, e, bm), out in zip(cases, outputs):
        assert_same(out, moe_align_reference(ids.cpu(), e, bm, 0))


@pytest.mark.parametrize("T,k,num_local,block_m", [(300, 4, 32, 64), (4096, 8, 128, 128)])  # one CTA, many CTAs
def test_align_captures_in_a_cuda_graph(T, k, num_local, block_m):
    ids = random_ids(T, k, 2 * num_local)
    outputs = pm.empty_align_outputs(T * k, num_local, block_m, ids.device)
    pm.align_into(ids, num_local, block_m, num_local, outputs)  # load the module outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pm.align_into(ids, num_local, block_m, num_local, outputs)
    for _ in range(3):
        ids.copy_(random_ids(T, k, 2 * num_local, 0.05))
        for t in outputs:
            poison_(t)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outputs, moe_align_reference(ids.cpu(), num_local, block_m, num_local))
        eager = align_poisoned(ids, num_local, block_m, num_local)  # eager calls between replays stay correct
        assert_same(eager, outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,k,H,aligned", [(1, 1, 128, True), (127, 8, 2048, True), (1024, 2, 1408, True),
                                           (33, 3, 768, False), (5, 2, 6, True)])
def test_combine_matches_reference_bitwise(dtype, T, k, H, aligned):
    num_local, offset = 4, 4
    ids = random_ids(T, k, 12, 0.1)
    slots = torch.randn(T * k, H, device="cuda").to(dtype)
    local = ((ids >= offset) & (ids < offset + num_local)).reshape(-1)
    slots[~local] = float("nan")  # rows GEMM2 never writes must not be read
    buffer = torch.empty(T * H + 1, dtype=dtype, device="cuda")
    output = buffer[:T * H] if aligned else buffer[1:]  # a 2- or 4-byte offset forces the scalar path
    output = poison_(output.view(T, H))
    pm.combine_into(slots, ids, output, num_local, offset)
    assert torch.equal(output, moe_combine_reference(slots, ids, num_local, offset))
    assert torch.equal(jitmoe.moe_combine(slots, ids, num_local, offset), output)


def test_combine_captures_in_a_cuda_graph():
    T, k, H = 64, 4, 256
    ids = random_ids(T, k, 8)
    slots = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
    output = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
    pm.combine_into(slots, ids, output, 8, 0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pm.combine_into(slots, ids, output, 8, 0)
    slots.copy_(torch.randn_like(slots))
    poison_(output)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(output, moe_combine_reference(slots, ids, 8, 0))
