"""The build machine: spec -> render -> key -> (warm? load) -> lock -> re-check -> stage -> build -> publish -> load.

Knows nothing about MoE: ops hand it KernelSpecs.
"""
from .arch import device_archs, normalize_arch
from .build import build_only, cache_entry_dir, load_module
from .compile_check import compile_cuda_sources
from .errors import (JitCompileError, JitError, MissingKernelError, ToolchainError,
                     UnsupportedSpecError)
from .spec import KernelSpec

__all__ = ["KernelSpec", "load_module", "compile_cuda_sources", "build_only", "cache_entry_dir", "device_archs", "normalize_arch",
           "JitError", "JitCompileError", "MissingKernelError", "ToolchainError", "UnsupportedSpecError"]
