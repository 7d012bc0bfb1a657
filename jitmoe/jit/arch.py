"""GPU arch detection, arch flags, nvcc discovery and version checks."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from .. import env
from .errors import ToolchainError

# Lowest nvcc release (major, minor) that can target each arch.
_MIN_NVCC = {"70": (10, 0), "75": (10, 0), "80": (11, 0), "86": (11, 1), "89": (11, 8), "90": (11, 8),
             "90a": (12, 0), "100a": (12, 8), "120a": (12, 8)}
_ARCH = re.compile(r"^\d{2,3}[af]?$")


def normalize_arch(arch: str) -> str:
    """'9.0a', 'sm_90a', '90a' -> '90a'; 'cpu' stays 'cpu'."""
    # Strings (every op call asks) through a cache; anything else, possibly unhashable, is parsed each time.
    return _normalize_arch_cached(arch) if isinstance(arch, str) else _normalize_arch(arch)


def _normalize_arch(arch) -> str:
    a = str(arch).strip().lower().replace("sm_", "").replace("compute_", "").replace(".", "")
    if a != "cpu" and not _ARCH.match(a):
        raise ValueError(f"arch: expected something like '80', '9.0a' or 'sm_90a', got {arch!r}")
    return a


_normalize_arch_cached = functools.lru_cache(maxsize=256)(_normalize_arch)


def arch_of_capability(major: int, minor: int) -> str:
    # Hopper's wgmma/TMA instructions need the arch-specific 'a' target.
    return f"{major}{minor}a" if major == 9 else f"{major}{minor}"


def device_archs(device=None) -> tuple[str, ...]:
    """The archs to build for: JITMOE_CUDA_ARCH_LIST if set, else the given (or current) CUDA device's arch."""
    forced = env.cuda_arch_list()
    if forced:
        return tuple(normalize_arch(a) for a in forced)
    import torch
    if isinstance(device, torch.device):  # the ops' case (x.device): no torch.device() round trip
        index = device.index
    else:
        index = device if device is None or isinstance(device, int) else torch.device(device).index
    return _device_arch(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> tuple[str, ...]:
    # Cached: every op launch asks, and torch's capability query costs several microseconds of host time.
    import torch
    major, minor = torch.cuda.get_device_capability(index)
    return (arch_of_capability(major, minor),)


def gencode_flags(archs) -> list[str]:
    flags = []
    for a in archs:
        if a == "cpu":
            continue
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


def find_nvcc() -> str | None:
    explicit = env.nvcc_path()
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        # A malformed CUDA_HOME such as ':/usr/local/cuda' would otherwise produce '-isystem :/usr/...'.
        for part in cuda_home.split(os.pathsep):
            cand = os.path.join(part, "bin", "nvcc")
            if part and os.path.isfile(cand):
                return cand
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.path.isfile(fallback) else None


@functools.lru_cache(maxsize=None)
def _nvcc_release_uncached(path: str, mtime_ns: int, size: int) -> str:
    memo = Path(env.cache_dir()) / "toolchain.json"
    ident = f"{os.path.realpath(path)}:{mtime_ns}:{size}"
    try:
        table = json.loads(memo.read_text())
        if ident in table:
            return table[ident]
    except (OSError, ValueError):
        table = {}
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    lines = [ln.strip() for ln in out.splitlines() if "release" in ln or ln.startswith("Build")]
    release = " | ".join(lines) or out.strip().splitlines()[-1]
    try:  # memo so warm processes skip the subprocess (a stat is enough to notice a changed nvcc)
        memo.parent.mkdir(parents=True, exist_ok=True)
        table[ident] = release
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, memo)
    except OSError:
        pass
    return release


def nvcc_release(path: str | None = None) -> str | None:
    """nvcc's release line (e.g. 'Cuda compilation tools, release 13.0, V13.0.48'), or None without nvcc."""
    path = path or find_nvcc()
    if not path:
        return None
    st = os.stat(path)
    return _nvcc_release_uncached(path, st.st_mtime_ns, st.st_size)


def nvcc_version(release: str) -> tuple[int, int]:
    m = re.search(r"release (\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_toolchain(archs) -> str:
    """Raise ToolchainError unless nvcc exists and supports every arch; returns nvcc's path."""
    nvcc = find_nvcc()
    if not nvcc:
        raise ToolchainError(
            "nvcc not found: set CUDA_HOME or JITMOE_NVCC, or put nvcc on PATH "
            f"(CUDA_HOME={os.environ.get('CUDA_HOME')!r}, torch CUDA={_torch_cuda()!r})")
    version = nvcc_version(nvcc_release(nvcc) or "")
    for a in archs:
        need = _MIN_NVCC.get(a)
        if need and version < need:
            raise ToolchainError(f"nvcc {version[0]}.{version[1]} at {nvcc} cannot target sm_{a} "
                                 f"(needs >= {need[0]}.{need[1]})")
    return nvcc


def _torch_cuda() -> str | None:
    import torch
    return torch.version.cuda


def cutlass_root() -> Path:
    """CUTLASS root holding include/ (JITMOE_CUTLASS_DIR, else the nvidia-cutlass wheel, found without importing it)."""
    override = env.cutlass_dir()
    if override:
        root = Path(override)
    else:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise ToolchainError("CUTLASS headers not found: pip install nvidia-cutlass, or set JITMOE_CUTLASS_DIR")
        root = Path(list(spec.submodule_search_locations)[0]) / "source"
    if not (root / "include" / "cutlass" / "cutlass.h").is_file():
        raise ToolchainError(f"CUTLASS headers not found under {root}/include (JITMOE_CUTLASS_DIR={override!r})")
    return root


@functools.lru_cache(maxsize=None)
def cutlass_version(root: Path) -> str:
    text = (root / "include" / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)
