"""nvcc -c of one SM90 grouped-GEMM spec, no GPU needed: it compiles for sm_90a, ptxas reports no serialized wgmma
(warning C7510, a performance bug) and no register spills."""
from __future__ import annotations

import re

import pytest

from jitmoe.jit import compile_cuda_sources
from jitmoe.jit.errors import ToolchainError
from jitmoe.ops.moe_gemm import GemmConfig, gemm_spec


def test_gemm1_bf16_swiglu_compiles_without_serialized_wgmma_or_spills(sm90_toolchain, tmp_path):
    try:
        spec = gemm_spec(GemmConfig("sm90", 128, 128, 64, 4), "bf16", "gemm1", "Swiglu", ("90a",))
        results = compile_cuda_sources(spec, tmp_path, ptxas_verbose=True)
    except ToolchainError as exc:  # nvcc older than 12.0 cannot target sm_90a
        pytest.skip(str(exc))
    assert [r.source for r in results] == ["sm90/gemm.cu"]
    output = results[0].output
    assert "registers" in output, f"ptxas -v printed no resource usage:\n{output}"
    assert "C7510" not in output and "serialized" not in output, output
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
    assert spills and not any(spills), output
