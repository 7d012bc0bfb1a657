"""Typed errors of the build machine."""
from __future__ import annotations


class JitError(RuntimeError):
    """Base class of every JIT failure."""


class UnsupportedSpecError(ValueError):
    """A spec that can never be built (raised before any compile)."""


class ToolchainError(JitError):
    """nvcc missing, too old for an arch, or CUTLASS headers not found."""


class MissingKernelError(JitError):
    """JITMOE_DISABLE_JIT is set and the kernel is not in the cache."""


class JitCompileError(JitError):
    """A build failed. Carries what a user needs to act without re-running anything."""

    def __init__(self, spec_name: str, command: str, log: str, log_path: str, returncode: int | None = None):
        self.spec_name = spec_name
        self.command = command
        self.log = log
        self.log_path = log_path
        self.returncode = returncode
        self.first_error = first_error_line(log)
        self.hint = build_hint(log, returncode)
        tail = "\n".join(log.strip().splitlines()[-40:])
        msg = (f"failed to build {spec_name}\n"
               f"  first error: {self.first_error or '(none found)'}\n"
               f"  command: {command}\n"
               f"  log: {log_path}\n")
        if self.hint:
            msg += f"  hint: {self.hint}\n"
        msg += f"--- last lines of the build output ---\n{tail}"
        super().__init__(msg)


def first_error_line(log: str) -> str | None:
    for line in log.splitlines():
        low = line.lower()
        if "error:" in low or "error :" in low or low.startswith("ld:") or "undefined reference" in low:
            return line.strip()
    return None


def build_hint(log: str, returncode: int | None) -> str | None:
    low = log.lower()
    if returncode in (137, -9) or "killed" in low or "out of memory" in low:
        return "the compiler was killed (likely out of memory): lower JITMOE_MAX_JOBS"
    if "unsupported gpu architecture" in low or "is not defined for option 'gpu-architecture'" in low:
        return "nvcc is too old for this arch: install a newer CUDA toolkit or point JITMOE_NVCC at one"
    if "no such file or directory" in low and ("#include" in low or "fatal error" in low):
        return "a header is missing: check CUDA_HOME (CUDA headers) or JITMOE_CUTLASS_DIR (CUTLASS headers)"
    if "cannot find -lcuda" in low:
        return "libcuda.so not found at link time: add the CUDA stubs dir to LIBRARY_PATH"
    return None
