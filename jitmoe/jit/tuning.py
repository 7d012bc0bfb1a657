"""A persistent store of tuning choices: string key -> JSON value, in memory and in one JSON file per store.

Knows nothing about what is tuned. The default file is ``<cache>/tuning/<jitmoe ver>/<torch+cuda tag>/<name>.json``
so an upgrade of jitmoe or torch starts from an empty store instead of reusing timings of other binaries.

- Reads are lazy (the file is read once, on the first ``get``) and take no lock: writers replace the file atomically.
- ``put`` writes through: under a ``filelock`` lock it re-reads the file, adds the entry, writes a temp file and
  ``os.replace``-s it, so choices that other processes stored meanwhile are kept (and become visible here).
- A corrupt or unreadable file is ignored with one warning per path; an unwritable cache keeps choices in memory
  and warns once. Nothing here raises for a bad file.
- ``load_file`` / ``save_file`` exchange choices with an explicit file (FlashInfer's ``autotune(cache=path)``).

File format: ``{"jitmoe_tuning": 1, "entries": {key: value, ...}}``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

from .build import cache_root, runtime_tag, version_dir

__all__ = ["TuningStore", "default_store_path"]

log = logging.getLogger("jitmoe.tuning")

FILE_FORMAT = 1
_LOCK_TIMEOUT_S = 30.0
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()
_NAME = re.compile(r"[A-Za-z0-9_.]+")


def default_store_path(name: str) -> Path:
    """Where the store ``name`` lives under the current cache root."""
    return cache_root() / "tuning" / version_dir() / runtime_tag() / f"{name}.json"


def _warn_once(tag: str, message: str) -> None:
    with _WARNED_LOCK:
        if tag in _WARNED:
            return
        _WARNED.add(tag)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read_entries(path: Path) -> dict:
    """The entries of a store file; {} when it is missing, unreadable or not a store file (warned once)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        _warn_once(f"read:{path}", f"jitmoe: ignoring unreadable tuning file {path}: {exc}")
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        _warn_once(f"read:{path}", f"jitmoe: ignoring corrupt tuning file {path}: {exc}")
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or data.get("jitmoe_tuning") != FILE_FORMAT:
        _warn_once(f"read:{path}", f"jitmoe: ignoring {path}: not a jitmoe tuning file of format {FILE_FORMAT}")
        return {}
    return entries


def _write_atomic(path: Path, entries: dict) -> None:
    """Write the whole file to a private temp file in the same directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"jitmoe_tuning": FILE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _merge_into_file(path: Path, updates: dict) -> dict:
    """Under the file's lock: read it, add ``updates`` (they win), write it back; returns the merged entries.
    Raises OSError (filelock.Timeout is one)."""
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{path}.lock", timeout=_LOCK_TIMEOUT_S, thread_local=False):
        merged = _read_entries(path)
        merged.update(updates)
        _write_atomic(path, merged)
    return merged


def _json_copy(key, value):
    """(key, a JSON round-tripped copy of value): what a reader of the file will see. TypeError if impossible."""
    if not isinstance(key, str):
        raise TypeError(f"key: expected a str, got {type(key).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"value: expected a JSON-serialisable value for key {key!r}, got {value!r} ({exc})") from None


class TuningStore:
    """One named store. ``path`` None: the default file under the cache root, resolved on first use."""

    def __init__(self, name: str, path: Optional[os.PathLike | str] = None):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"name: expected letters, digits, '_' or '.', got {name!r}")
        self.name = name
        self._path = Path(path) if path is not None else None
        self._entries: Optional[dict] = None  # None until the file was read
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = default_store_path(self.name)
        return self._path

    def _loaded(self) -> dict:
        entries = self._entries
        if entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = _read_entries(self.path)
                entries = self._entries
        return entries

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value (memory, else the file as read once), or ``default``. Never writes, never locks."""
        return self._loaded().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._loaded()

    def snapshot(self) -> dict:
        """A copy of every entry known to this process."""
        return dict(self._loaded())

    def put(self, key: str, value: Any, *, persist: bool = True) -> None:
        """Store ``value`` in memory and (``persist``) in the file, merged with what other processes wrote."""
        value = _json_copy(key, value)
        entries = self._loaded()
        with self._lock:
            entries[key] = value
        if persist:
            self._persist({key: value})

    def _persist(self, updates: dict) -> None:
        try:
            merged = _merge_into_file(self.path, updates)
        except OSError as exc:  # also filelock.Timeout, a TimeoutError
            _warn_once(f"write:{self.path}", f"jitmoe: tuning choices kept in memory only, could not write "
                                             f"{self.path}: {exc}")
            return
        with self._lock:
            for k, v in merged.items():
                self._entries.setdefault(k, v)  # this process's own choices stay as they are

    def load_file(self, path: os.PathLike | str) -> int:
        """Add the entries of an explicit file to memory (not to the store's file); returns how many. A missing
        file adds nothing; a corrupt one is ignored with a warning."""
        found = _read_entries(Path(path))
        entries = self._loaded()
        with self._lock:
            entries.update(found)
        log.info("loaded %d tuning choices from %s", len(found), path)
        return len(found)

    def save_file(self, path: os.PathLike | str) -> int:
        """Write every entry known here to an explicit file, merged into what it holds; returns how many were
        written. Raises OSError when the file cannot be written (the caller asked for this file)."""
        entries = self.snapshot()
        _merge_into_file(Path(path), entries)
        return len(entries)
