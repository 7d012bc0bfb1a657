"""Every ``JITMOE_*`` environment variable, read in one place.

Values are read on each call (not cached at import) so tests and long-lived processes see changes.
The README documents the same table.
"""
from __future__ import annotations

import functools
import os
import shlex

__all__ = ["ENV_VARS", "cache_dir", "cuda_arch_list", "max_jobs", "verbose", "debug", "disable_jit",
           "cutlass_dir", "nvcc_path", "extra_cuda_cflags", "lock_log_seconds", "tuning_enabled"]

# name -> one-line description (the README table and `jitmoe env` print this).
ENV_VARS = {
    "JITMOE_CACHE_DIR": "cache root (default: platformdirs user cache dir for 'jitmoe')",
    "JITMOE_CUDA_ARCH_LIST": "archs to build for, e.g. '8.0;9.0a' (default: the tensor's device)",
    "JITMOE_MAX_JOBS": "parallel compile jobs per build (default: MAX_JOBS, else min(cpus, free GiB / 4))",
    "JITMOE_VERBOSE": "1: stream compiler output and log cache decisions",
    "JITMOE_DEBUG": "1: build with -O0 -g -lineinfo and keep asserts (separate cache keys)",
    "JITMOE_DISABLE_JIT": "1: never compile; a cache miss raises MissingKernelError naming the prewarm command",
    "JITMOE_CUTLASS_DIR": "CUTLASS root (with include/) overriding the nvidia-cutlass wheel's headers",
    "JITMOE_NVCC": "nvcc to use (default: CUDA_HOME/bin/nvcc, then PATH, then /usr/local/cuda)",
    "JITMOE_EXTRA_CUDA_CFLAGS": "extra nvcc flags (shell-quoted); part of the cache key",
    "JITMOE_LOCK_LOG_SECONDS": "while waiting on another process's build, log every N seconds (default 15)",
    "JITMOE_TUNING": "0: ignore stored autotune choices and never tune (default: use them; tune inside autotune())",
    "JITMOE_PDL": "0: launch the fused-MoE and Expert Choice kernels without programmatic dependent launch "
                  "(default: on, SM90+; read by the C++ launchers)",
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    path = os.environ.get("JITMOE_CACHE_DIR")
    if path:
        return os.path.abspath(os.path.expanduser(path))
    import platformdirs
    return platformdirs.user_cache_dir("jitmoe")


def cuda_arch_list() -> tuple[str, ...] | None:
    """Archs from JITMOE_CUDA_ARCH_LIST normalised to '80', '90a', ... or None when unset."""
    return _parse_arch_list(os.environ.get("JITMOE_CUDA_ARCH_LIST", ""))


@functools.lru_cache(maxsize=64)  # every op call reads the variable; parse each value once
def _parse_arch_list(raw: str) -> tuple[str, ...] | None:
    raw = raw.strip()
    if not raw:
        return None
    items = [a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a]
    return tuple(sorted({a.replace(".", "").replace("sm_", "").replace("+PTX", "") for a in items}))


def max_jobs() -> int:
    raw = os.environ.get("JITMOE_MAX_JOBS") or os.environ.get("MAX_JOBS")
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise ValueError(f"JITMOE_MAX_JOBS: expected a positive integer, got {raw!r}") from None
    cpus = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        free_gib = 4.0 * cpus
    return max(1, min(cpus, int(free_gib // 4)))


def verbose() -> bool:
    return _flag("JITMOE_VERBOSE")


def debug() -> bool:
    return _flag("JITMOE_DEBUG")


def disable_jit() -> bool:
    return _flag("JITMOE_DISABLE_JIT")


def cutlass_dir() -> str | None:
    return os.environ.get("JITMOE_CUTLASS_DIR") or None


def nvcc_path() -> str | None:
    return os.environ.get("JITMOE_NVCC") or None


def extra_cuda_cflags() -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get("JITMOE_EXTRA_CUDA_CFLAGS", "")))


def lock_log_seconds() -> float:
    return float(os.environ.get("JITMOE_LOCK_LOG_SECONDS", "15"))


def tuning_enabled() -> bool:
    """False when JITMOE_TUNING is 0/false/no/off: stored autotune choices are ignored and nothing is tuned."""
    raw = os.environ.get("JITMOE_TUNING")
    return raw is None or raw.strip().lower() not in ("0", "false", "no", "off")
