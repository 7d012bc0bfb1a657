"""Cache layout, per-key lock, staging build, atomic publish and the warm path.

    spec -> key -> (warm? import) -> lock -> re-check -> stage -> build -> publish -> import

Correctness never depends on the lock: a module is published by renaming a complete directory into place and is
only trusted once its meta.json (written last) exists. The lock (flock via filelock, never deleted) only stops
processes from building the same key twice. The warm path takes no lock and runs no ninja: it imports module.so.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import env
from . import arch as _arch
from .errors import JitCompileError, MissingKernelError
from .spec import KernelSpec, key_of, partial_key_of

log = logging.getLogger("jitmoe.jit")

# Process-wide counters; tests and `jitmoe env` read them ('built', 'warm', 'waited', 'memo').
STATS = {"built": 0, "warm": 0, "waited": 0, "memo": 0}
_MODULES: dict[KernelSpec, object] = {}  # the hot path: spec -> imported module, no filesystem work
_READONLY_WARNED: set[str] = set()
_STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Entry:
    """Where a spec lives in the cache and under which names."""

    spec: KernelSpec
    inputs: dict
    key: str
    root: Path

    @property
    def module_name(self) -> str:
        return f"{self.spec.readable_name}_{self.key[:16]}"

    @property
    def dir(self) -> Path:
        return self.root / version_dir() / runtime_tag() / self.spec.arch_tag / \
            f"{self.spec.readable_name}-{self.key[:16]}"

    @property
    def lock_path(self) -> Path:
        return self.root / "locks" / f"{self.spec.readable_name}-{self.key[:16]}.lock"


def version_dir() -> str:
    from .. import __version__
    return __version__


def runtime_tag() -> str:
    """torch + CUDA + Python ABI: binaries built against one never load into another."""
    import torch
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    return f"torch{torch.__version__.split('+')[0]}_{cuda}_{sys.implementation.cache_tag}"


def cache_root() -> Path:
    return Path(env.cache_dir())


def resolve(spec: KernelSpec) -> Entry:
    toolchain = _arch.nvcc_release() if spec.has_cuda else None
    inputs = spec.key_inputs(toolchain)
    return Entry(spec, inputs, key_of(inputs), cache_root())


def cache_entry_dir(spec: KernelSpec) -> Path:
    return resolve(spec).dir


def load_module(spec: KernelSpec):
    """The imported module for ``spec``: from memory, else from the cache, else built (once across processes)."""
    mod = _MODULES.get(spec)
    if mod is not None:
        STATS["memo"] += 1
        return mod
    entry = resolve(spec)
    mod = _try_import(entry.dir)
    if mod is None and entry.inputs["toolchain"] is None and spec.has_cuda:
        mod = _find_prebuilt_without_nvcc(entry)
    if mod is not None:
        STATS["warm"] += 1
    else:
        mod = _build(entry)
    _MODULES[spec] = mod
    return mod


def build_only(spec: KernelSpec) -> tuple[str, float, bool]:
    """Build (or find) a spec without keeping it in memory: (cache dir, seconds, was it built now)."""
    before = STATS["built"]
    start = time.perf_counter()
    load_module(spec)
    return str(resolve(spec).dir), time.perf_counter() - start, STATS["built"] > before


# -- warm path ---------------------------------------------------------------------------------------------------
def _try_import(entry_dir: Path):
    """Import a published module, or None. Never raises: a missing, corrupt or unloadable artifact is a miss."""
    so, meta_path = entry_dir / "module.so", entry_dir / "meta.json"
    if not (so.is_file() and meta_path.is_file()):
        return None
    try:
        return _import_so(json.loads(meta_path.read_text())["module_name"], so)
    except Exception as exc:  # noqa: BLE001 - any failure to load means "rebuild"
        log.warning("jitmoe: cached %s failed to load (%s); rebuilding", entry_dir.name, exc)
        return None


def _import_so(module_name: str, so: Path):
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(so))
    mod_spec = importlib.util.spec_from_file_location(module_name, str(so), loader=loader)
    module = importlib.util.module_from_spec(mod_spec)
    loader.exec_module(module)
    return module


def _find_prebuilt_without_nvcc(entry: Entry):
    """No nvcc here: accept a module whose key matches in everything but the compiler release."""
    want = partial_key_of(entry.inputs)
    for meta_path in entry.dir.parent.glob(f"{entry.spec.readable_name}-*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("partial_key") == want:
            mod = _try_import(meta_path.parent)
            if mod is not None:
                return mod
    return None


# -- cold path ---------------------------------------------------------------------------------------------------
def _build(entry: Entry):
    if env.disable_jit():
        raise MissingKernelError(
            f"{entry.spec.readable_name} is not in the cache at {entry.dir} and JITMOE_DISABLE_JIT is set; build it "
            f"with: jitmoe prewarm --op {entry.spec.name} --arch {','.join(entry.spec.archs)}")
    if entry.spec.has_cuda:
        _arch.check_toolchain(entry.spec.archs)  # before any lock: fail fast with a clear message
    if not _writable(entry.root):
        return _build_readonly(entry)
    with _key_lock(entry):
        mod = _try_import(entry.dir)  # another process may have built it while we waited
        if mod is not None:
            STATS["warm"] += 1
            return mod
        _collect_stale_tmp(entry.root / "tmp")
        staging = entry.root / "tmp" / f"{entry.dir.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        mod, seconds = _compile(entry, staging)
        _publish(entry, staging, seconds)
        shutil.rmtree(staging, ignore_errors=True)  # the module stays mapped; the published copy is the real one
        return mod


def _build_readonly(entry: Entry):
    where = entry.root.as_posix()
    if where not in _READONLY_WARNED:
        _READONLY_WARNED.add(where)
        warnings.warn(f"jitmoe: cache dir {where} is not writable; building in a temporary dir (not reused by "
                      f"other processes). Set JITMOE_CACHE_DIR to a writable path or prewarm the cache.",
                      RuntimeWarning, stacklevel=3)
    staging = Path(tempfile.mkdtemp(prefix=f"jitmoe-{entry.spec.readable_name}-"))
    mod, _ = _compile(entry, staging)
    return mod


def _compile(entry: Entry, staging: Path):
    """Render into ``staging`` and build with torch.utils.cpp_extension.load; returns (module, seconds)."""
    from torch.utils import cpp_extension

    src_dir, build_dir = staging / "src", staging / "build"
    src_dir.mkdir(parents=True)
    build_dir.mkdir()
    paths = []
    for name, text in entry.spec.rendered_sources().items():
        path = src_dir / name.replace("/", "__")  # flat: torch names objects after the file's basename
        path.write_text(text)
        paths.append(str(path))
    flags = entry.spec.resolved_flags()
    log_path = staging / "build.log"
    log.info("jitmoe: compiling %s (first use; `jitmoe prewarm` builds ahead of time)", entry.spec.readable_name)
    start = time.perf_counter()
    # torch renames a module it already built in this process (name_v1, ...); we key by content, so reset it.
    cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(entry.module_name, None)
    try:
        with _output_to(log_path), _max_jobs_env():
            module = cpp_extension.load(
                name=entry.module_name, sources=paths, extra_cflags=flags["cflags"],
                extra_cuda_cflags=flags["cuda_cflags"], extra_ldflags=flags["ldflags"],
                extra_include_paths=_include_dirs(entry.spec), build_directory=str(build_dir),
                with_cuda=entry.spec.has_cuda, verbose=True)
    except (RuntimeError, OSError, ImportError) as exc:
        text = _read(log_path) + f"\n{exc}"
        raise JitCompileError(entry.spec.readable_name, _failed_command(text, build_dir), text, str(log_path),
                              _returncode(exc)) from None
    seconds = time.perf_counter() - start
    STATS["built"] += 1
    if env.verbose():
        sys.stderr.write(_read(log_path))
    log.info("jitmoe: built %s in %.1f s", entry.spec.readable_name, seconds)
    return module, seconds


def _include_dirs(spec: KernelSpec) -> list[str]:
    """The template root, the op's folder and each source's folder, so templates may include relatively."""
    root = spec.template_root
    dirs = list(spec.include_dirs())
    for d in {root / spec.template_dir} | {(root / spec.template_dir / s).parent for s in spec.sources}:
        if str(d) not in dirs:
            dirs.append(str(d))
    return dirs


def _publish(entry: Entry, staging: Path, seconds: float) -> None:
    """Move a complete directory into place, then write meta.json last (its presence marks the entry valid)."""
    ready, module_name = staging / "entry", entry.module_name
    ready.mkdir()
    shutil.copy2(staging / "build" / f"{module_name}.so", ready / "module.so")
    _fsync(ready / "module.so")
    shutil.copy2(staging / "build.log", ready / "build.log")
    entry.dir.parent.mkdir(parents=True, exist_ok=True)
    if entry.dir.exists():  # an invalid leftover (we hold the lock and it did not load): set it aside
        os.replace(entry.dir, staging / "replaced")
    os.replace(ready, entry.dir)
    meta = {"module_name": module_name, "key": entry.key, "partial_key": partial_key_of(entry.inputs),
            "spec": entry.spec.readable_name, "op": entry.spec.name, "archs": list(entry.spec.archs),
            "build_seconds": round(seconds, 2), "created": time.time(), "inputs": entry.inputs,
            "spec_fields": entry.spec.to_dict()}
    tmp = entry.dir / f"meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    _fsync(tmp)
    os.replace(tmp, entry.dir / "meta.json")


@contextlib.contextmanager
def _key_lock(entry: Entry):
    """Per-key flock. Waiting is logged with the holder's pid/host; the lock file is never deleted."""
    import filelock

    entry.lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(entry.lock_path), thread_local=False)
    owner = entry.lock_path.with_suffix(".owner")
    waited = False
    while True:
        try:
            lock.acquire(timeout=env.lock_log_seconds())
            break
        except filelock.Timeout:
            waited = True
            log.warning("jitmoe: waiting for %s: being built by %s", entry.spec.readable_name, _read(owner).strip())
    try:
        STATS["waited"] += int(waited)
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n")
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _output_to(path: Path):
    """Send fd 1 (where ninja and nvcc write) to ``path`` for the duration, so the build log is complete."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as fh:
        os.dup2(fh.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def _max_jobs_env():
    old = os.environ.get("MAX_JOBS")
    os.environ["MAX_JOBS"] = str(env.max_jobs())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MAX_JOBS", None)
        else:
            os.environ["MAX_JOBS"] = old


def _writable(root: Path) -> bool:
    try:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        probe = root / "tmp" / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def _collect_stale_tmp(tmp_dir: Path) -> None:
    """Staging dirs of killed builds are harmless; drop the ones older than a day."""
    now = time.time()
    for child in tmp_dir.glob("*"):
        with contextlib.suppress(OSError):
            if child.is_dir() and now - child.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(child, ignore_errors=True)


def _failed_command(log_text: str, build_dir: Path) -> str:
    """The command ninja reports after 'FAILED:', else the rule templates from build.ninja."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("FAILED:"):
            return lines[i + 1].strip()
    ninja = build_dir / "build.ninja"
    lines = [ln.strip()[len("command = "):] for ln in _read(ninja).splitlines() if ln.strip().startswith("command = ")]
    return " ;; ".join(lines) or f"ninja -C {build_dir}"


def _returncode(exc: BaseException) -> int | None:
    cause = exc.__cause__ or exc.__context__
    return getattr(cause, "returncode", None)


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
