"""nvcc -c of the persistent warp-specialised SM90 grouped GEMM ('sm90ws'), no GPU needed: each spec compiles for
sm_90a, ptxas reports no serialized wgmma (warning C7510, a performance bug) and no register spills."""
from __future__ import annotations

import re

import pytest

from jitmoe.jit import KernelSpec, compile_cuda_sources
from jitmoe.jit.errors import ToolchainError


def sm90ws_spec(dtype, act, mode, block_n, stages, cluster_m, operand=None) -> KernelSpec:
    """operand: None (16-bit), 'e4m3' (FP8) or 's8' (16-bit A, int8 weights)."""
    weight = operand or dtype
    operand = None if operand == "s8" else operand
    params = {"kernel": "sm90ws", "dtype": dtype, "operand": operand or dtype, "weight": weight, "act": act,
              "mode": mode,
              "block_m": 128, "block_n": block_n, "block_k": 128 if operand == "e4m3" else 64, "stages": stages,
              "cluster_m": cluster_m}
    return KernelSpec.create("moe_gemm", "moe", ("sm90ws/gemm.cu", "moe_gemm_binding.cpp"), params, ("90a",),
                             cutlass=True)


@pytest.mark.parametrize("dtype, act, mode, block_n, stages, cluster_m, operand", [
    ("bf16", "Swiglu", "gemm1", 128, 4, 1, None),     # gated: two 64x128 accumulators per consumer warpgroup
    ("bf16", "Gelu", "gemm1", 256, 3, 1, None),       # non-gated, widest tile
    ("fp16", "Identity", "gemm2", 256, 3, 1, None),   # scatter epilogue with routing weights
    ("bf16", "Swiglu", "gemm1", 128, 4, 2, None),     # clusters of two multicasting the weight tile
    ("bf16", "Swiglu", "gemm1", 128, 4, 2, "e4m3"),   # FP8: e4m3 wgmma, e4m3 output (GEMM2's input)
    ("fp16", "Relu2", "gemm1", 64, 6, 1, "e4m3"),     # FP8 output rows of only four 16-byte chunks
    ("bf16", "Identity", "gemm2", 256, 3, 1, "e4m3"),  # FP8 operands, bf16 output
    ("bf16", "Swiglu", "gemm1", 128, 4, 1, "s8"),     # int8 weights: converted B slots, gated (256 B rows)
    ("fp16", "Identity", "gemm2", 256, 3, 1, "s8"),   # int8 weights, the widest one-half tile
    ("bf16", "Gelu", "gemm1", 64, 6, 1, "s8"),        # int8 weights, the narrow tile (one chunk per thread)
])
def test_sm90ws_compiles_without_serialized_wgmma_or_spills(sm90_toolchain, tmp_path, dtype, act, mode, block_n,
                                                            stages, cluster_m, operand):
    try:
        results = compile_cuda_sources(sm90ws_spec(dtype, act, mode, block_n, stages, cluster_m, operand), tmp_path,
                                       ptxas_verbose=True)
    except ToolchainError as exc:  # nvcc older than 12.0 cannot target sm_90a
        pytest.skip(str(exc))
    assert [r.source for r in results] == ["sm90ws/gemm.cu"]
    output = results[0].output
    for kernel in ("moe_gemm_sm90ws_kernel", "invert_sorted_ids_kernel", "gather_token_rows_kernel"):
        assert kernel in output or mode == "gemm2", output
    assert "registers" in output, f"ptxas -v printed no resource usage:\n{output}"
    assert "C7510" not in output and "serialized" not in output, output
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
    assert spills and not any(spills), output
