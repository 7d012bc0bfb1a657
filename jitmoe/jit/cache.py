"""Inspect and prune the cache: list entries (valid / stale), clear them, summarise the set-up."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import arch as _arch
from .build import cache_root, resolve, runtime_tag, version_dir
from .spec import KernelSpec


@dataclass
class CacheEntry:
    path: str
    spec: str
    op: str
    archs: list
    size_bytes: int
    created: float
    build_seconds: float
    status: str  # 'valid' | 'stale' | 'incomplete' | 'unknown'

    def as_dict(self) -> dict:
        return asdict(self)


def iter_entries(root: Path | None = None) -> list[CacheEntry]:
    root = Path(root or cache_root())
    entries = []
    for entry_dir in sorted(root.glob("*/*/*/*-*")):
        if entry_dir.parent.parent.parent.parent != root or not entry_dir.is_dir():
            continue
        meta = _meta(entry_dir)
        entries.append(CacheEntry(
            path=str(entry_dir), spec=meta.get("spec", entry_dir.name), op=meta.get("op", "?"),
            archs=meta.get("archs", []), size_bytes=_du(entry_dir), created=meta.get("created", 0.0),
            build_seconds=meta.get("build_seconds", 0.0), status=_status(entry_dir, meta)))
    return entries


def _meta(entry_dir: Path) -> dict:
    try:
        return json.loads((entry_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _status(entry_dir: Path, meta: dict) -> str:
    """valid: this jitmoe/torch would load it for its spec; stale: it never will again."""
    if not meta or not (entry_dir / "module.so").is_file():
        return "incomplete"
    tag_dir, ver_dir = entry_dir.parent.parent, entry_dir.parent.parent.parent
    if ver_dir.name != version_dir() or tag_dir.name != runtime_tag():
        return "stale"
    try:
        current = resolve(KernelSpec.from_dict(meta["spec_fields"]))
    except Exception:  # noqa: BLE001 - a spec that no longer renders (templates moved, custom root) is unknown
        return "unknown"
    return "valid" if current.key == meta.get("key") else "stale"


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _clear_tuning(root: Path, stale_only: bool) -> list[str]:
    """Remove tuning stores (``<root>/tuning/<version>/<runtime tag>/``): all, or (stale_only) those written by
    another jitmoe version or torch/CUDA build, which the current one never reads."""
    tuning = root / "tuning"
    if not tuning.is_dir():
        return []
    current = tuning / version_dir() / runtime_tag()
    removed = []
    for store in sorted(p for version in tuning.iterdir() if version.is_dir() for p in version.iterdir()):
        if stale_only and store == current:
            continue
        if store.is_dir():
            shutil.rmtree(store, ignore_errors=True)
        else:
            store.unlink(missing_ok=True)
        removed.append(str(store))
    for version in tuning.iterdir():
        if version.is_dir() and not any(version.iterdir()):
            version.rmdir()
    return removed


def clear(*, stale_only: bool = False, root: Path | None = None) -> list[str]:
    """Remove entries (all, or only stale/incomplete ones), leftover staging dirs and tuning stores (all, or those
    of other versions: ``_clear_tuning``). Lock files are kept."""
    import filelock

    root = Path(root or cache_root())
    removed = _clear_tuning(root, stale_only)
    for entry in iter_entries(root):
        if stale_only and entry.status in ("valid", "unknown"):
            continue
        lock = filelock.FileLock(str(root / "locks" / f"{Path(entry.path).name}.lock"), thread_local=False)
        try:
            lock.acquire(timeout=0)  # skip keys being built right now
        except filelock.Timeout:
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            lock.release()
    if (root / "tmp").is_dir():
        for child in (root / "tmp").iterdir():
            if not stale_only or not _pid_alive(child.name):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(str(child))
    return removed


def _pid_alive(staging_name: str) -> bool:
    """Staging dirs are named <entry>.<host>.<pid>.<uuid>; a dead pid on this host means a killed build."""
    parts = staging_name.rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
        return True
    except OSError:
        return False


def info(root: Path | None = None) -> dict:
    root = Path(root or cache_root())
    entries = iter_entries(root) if root.is_dir() else []
    nvcc = _arch.find_nvcc()
    cutlass = None
    with contextlib.suppress(Exception):
        cutlass_root = _arch.cutlass_root()
        cutlass = f"{_arch.cutlass_version(cutlass_root)} at {cutlass_root}"
    import torch
    return {
        "cache_dir": str(root), "filesystem": _fs_type(root), "entries": len(entries),
        "valid": sum(e.status == "valid" for e in entries), "size_mb": round(sum(e.size_bytes for e in entries) / 2**20, 1),
        "runtime_tag": runtime_tag(), "nvcc": nvcc, "nvcc_release": _arch.nvcc_release(nvcc) if nvcc else None,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cutlass": cutlass,
        "device_archs": _device_archs_or_none(),
    }


def _device_archs_or_none():
    import torch
    if not torch.cuda.is_available():
        return None
    return [_arch.arch_of_capability(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def _fs_type(path: Path) -> str:
    """The filesystem holding the cache (NFS/GPFS homes deserve a node-local JITMOE_CACHE_DIR)."""
    best, fs = "", "unknown"
    target = str(path if path.exists() else path.parent)
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fs = parts[1], parts[2]
    return fs
