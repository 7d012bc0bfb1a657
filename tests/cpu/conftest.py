import pytest

from jitmoe.jit.arch import cutlass_root, find_nvcc
from jitmoe.jit.errors import ToolchainError


@pytest.fixture
def sm90_toolchain(monkeypatch):
    """nvcc and the CUTLASS headers for the SM90 compile tests (skip without them), in a release build."""
    monkeypatch.delenv("JITMOE_DEBUG", raising=False)  # a debug build keeps asserts, which serialize wgmma
    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    try:
        cutlass_root()
    except ToolchainError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def cpu_pipeline(monkeypatch):
    """fused_moe._run_cuda on CPU tensors: reference align/combine, moe_gemm's CPU path, an H100's arch and SM
    count (the CUDA pipeline's plumbing without a GPU)."""
    from jitmoe.ops import fused_moe as fm
    from jitmoe.reference.moe import moe_align_reference, moe_combine_reference, slot_rows_reference

    def align_into(ids, num_local, block_m, offset, outputs, slot_rows=None, block_done=None):
        for out, ref in zip(outputs, moe_align_reference(ids, num_local, block_m, offset)):
            out.copy_(ref)
        if slot_rows is not None:
            slot_rows.copy_(slot_rows_reference(outputs[0], ids.numel()))
        if block_done is not None:
            block_done.zero_()

    def combine_into(out_slots, ids, output, num_local, offset):
        output.copy_(moe_combine_reference(out_slots, ids, num_local, offset))

    monkeypatch.setattr(fm, "_device_arch", lambda index: "90a")
    monkeypatch.setattr(fm, "_device_sms", lambda index: 132)
    monkeypatch.setattr(fm._permute, "align_into", align_into)
    monkeypatch.setattr(fm._permute, "combine_into", combine_into)
