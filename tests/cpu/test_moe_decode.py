"""The decode path's rules, specs and errors, and an nvcc -c of its template (no GPU needed); its numerics are
checked on the GPU through cutlass_fused_moe (tests/gpu/test_fused_moe.py runs every test on kernel 'decode')."""
from __future__ import annotations

import re

import pytest
import torch

from jitmoe.jit import compile_cuda_sources
from jitmoe.jit.arch import find_nvcc
from jitmoe.ops import fused_moe as fm
from jitmoe.ops import moe_decode as dec
from jitmoe.ops import prewarm_registry


@pytest.mark.parametrize("tokens, topk, experts, expected", [
    (0, 8, 128, False),
    (1, 2, 8, True), (2, 2, 8, True), (4, 2, 8, False),        # Mixtral: 8 slots on 8 experts share them
    (8, 8, 128, True), (16, 8, 128, False),                     # Qwen3: up to E / 2 slots
    (4, 8, 64, True), (8, 8, 64, False),                        # OLMoE
    (8, 8, 256, True), (16, 8, 256, False), (16, 1, 256, False),  # DeepSeek-V3; never past 8 tokens
])
def test_use_decode_takes_few_tokens_on_distinct_experts(tokens, topk, experts, expected):
    assert dec.use_decode(tokens, topk, experts, 2048, 768) is expected


@pytest.mark.parametrize("tokens, topk, experts, expected", [
    (1, 2, 8, True), (2, 8, 64, True), (4, 2, 8, False),         # Mixtral: as in 16 bits
    (4, 8, 64, True), (4, 8, 256, True), (3, 8, 48, True),       # slots <= E / 2 (experts of 2048 x 768)
    (8, 8, 128, False), (8, 8, 256, False), (5, 8, 256, False),  # FP8 stops at 4 tokens (its grouped GEMMs win)
])
def test_fp8_takes_the_decode_path_up_to_four_tokens(tokens, topk, experts, expected):
    assert dec.use_decode(tokens, topk, experts, 2048, 768, elem_bytes=1) is expected


@pytest.mark.parametrize("hidden, inter, expected", [(2048, 768, True), (2048, 2048, True), (4096, 1536, False),
                                                     (3584, 2560, False), (7168, 2048, False)])
def test_fp8_takes_three_or_four_tokens_only_for_small_experts(hidden, inter, expected):
    """Past 2 tokens FP8 decodes only experts of at most 4 Mi elements per matrix (its grouped GEMMs win above)."""
    assert dec.use_decode(4, 8, 256, hidden, inter, elem_bytes=1) is expected
    assert dec.use_decode(2, 8, 256, hidden, inter, elem_bytes=1)    # up to 2 tokens: always
    assert dec.use_decode(4, 8, 256, hidden, inter)                  # 16-bit: no size limit


@pytest.mark.parametrize("shape, fits", [
    ((1, 8, 7168, 2048), True),      # DeepSeek-V3
    ((1, 8, 4096, 14336), True),     # long rows: nothing is staged in shared memory
    ((1, 1, 65536, 256), True),
    ((8191, 8, 256, 256), True),     # 65528 slots
    ((8192, 8, 256, 256), False),    # 65536 slots: more than a grid's y dimension
    ((1, 2, 1028, 256), False),      # H not a multiple of 8
    ((1, 2, 1024, 260), False),      # I not a multiple of 8
])
def test_fits_decode_bounds_the_grid_and_chunks(shape, fits):
    assert dec.fits_decode(*shape) is fits
    tokens, topk, hidden, inter = shape
    if tokens == 1:  # one token: only the fit decides
        assert dec.use_decode(tokens, topk, 256, hidden, inter) is fits


@pytest.mark.parametrize("hidden, inter, fits", [(2048, 768, True), (1040, 272, True), (1032, 768, False),
                                                 (2048, 776, False)])
def test_fp8_rows_are_whole_chunks_of_sixteen(hidden, inter, fits):
    """e4m3 operands: a 16-byte chunk holds 16 of them (the 16-bit kernels' multiple of 8 is not enough)."""
    assert dec.fits_decode(1, 8, hidden, inter, elem_bytes=1) is fits
    assert dec.use_decode(1, 8, 128, hidden, inter, elem_bytes=1) is fits
    assert dec.fits_decode(1, 8, hidden, inter)  # multiples of 8 all


def test_run_decode_rejects_shapes_it_cannot_run():
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    one = torch.zeros(1, 1, 1, dtype=torch.bfloat16)  # expanded views: the weights are never read
    fc1, fc2 = one.expand(8, 2 * 1020, 4096), one.expand(8, 4096, 1020)  # I = 1020: not whole 16-byte chunks
    ids = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="does not fit the decode kernels"):
        dec.run_decode(torch.empty_like(x), x, ids, torch.ones(8), fc1, fc2, None, None, {}, "Swiglu", 0)


def test_force_kernel_accepts_the_decode_path():
    with fm.force_kernel("decode"):
        assert fm._forced_kernel == "decode"
    assert fm._forced_kernel == ""
    with pytest.raises(ValueError, match="kernel: expected None or one of"):
        with fm.force_kernel("gemv"):
            pass


def test_spec_and_prewarm():
    spec = dec.decode_spec("bf16", "Swiglu", ("90a",))
    assert dict(spec.params) == {"dtype": "bf16", "operand": "bf16", "weight": "bf16", "act": "Swiglu"}
    assert spec.readable_name.startswith("moe_decode_bf16_bf16_bf16_Swiglu")
    specs = prewarm_registry()["fused_moe_decode"](["bf16", "fp16", "fp32"], [8], ["80", "90a"])
    assert len(specs) == 2 * len(dec.ACTIVATIONS) and all(dict(s.params)["dtype"] != "fp32" for s in specs)


def test_fp8_spec_and_prewarm_for_sm90a_only():
    spec = dec.decode_spec("fp16", "Gelu", ("90a",), "e4m3")
    assert dict(spec.params) == {"dtype": "fp16", "operand": "e4m3", "weight": "e4m3", "act": "Gelu"}
    assert spec != dec.decode_spec("fp16", "Gelu", ("90a",))
    specs = prewarm_registry()["fused_moe_decode"](["fp8"], [8], ["80", "90a"])
    assert len(specs) == len(dec.ACTIVATIONS)
    assert all(dict(s.params)["operand"] == "e4m3" and tuple(s.archs) == ("90a",) for s in specs)
    assert prewarm_registry()["fused_moe_decode"](["fp8"], [8], ["80"]) == []
    with pytest.raises(ValueError, match="operand"):
        dec.decode_spec("bf16", "Swiglu", ("90a",), "fp16")


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("act", ["Swiglu", "Gelu"])
def test_template_compiles_without_spills(act, tmp_path, monkeypatch):
    monkeypatch.delenv("JITMOE_DEBUG", raising=False)
    results = compile_cuda_sources(dec.decode_spec("bf16", act, ("80", "90a")), tmp_path, ptxas_verbose=True)
    assert [r.source for r in results] == ["moe_decode.cu"]
    output = results[0].output
    assert "registers" in output, output
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
    assert spills and not any(spills), output


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_fp8_template_compiles_for_sm90a(tmp_path, monkeypatch):
    """The e4m3 form (its GEMM2 spills a few bytes at the 64-register cap; see moe_decode.cuh's kMinBlocks2)."""
    monkeypatch.delenv("JITMOE_DEBUG", raising=False)
    results = compile_cuda_sources(dec.decode_spec("bf16", "Swiglu", ("90a",), "e4m3"), tmp_path, ptxas_verbose=True)
    output = results[0].output
    assert output.count("Compiling entry function") == 2 and "registers" in output, output
