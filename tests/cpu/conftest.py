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
