"""Template rendering and include scanning (stdlib only).

Templates use ``string.Template`` placeholders (``${name}``); ``$$`` is a literal dollar sign. Rendering is strict:
a placeholder without a value is an error, so a spec can never silently render half a kernel.
"""
from __future__ import annotations

import functools
import os
import re
import string
from pathlib import Path
from typing import Mapping

from .errors import UnsupportedSpecError

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def render(text: str, params: Mapping[str, object], *, source_name: str = "<template>") -> str:
    values = {k: _format_value(v) for k, v in params.items()}
    try:
        return string.Template(text).substitute(values)
    except KeyError as exc:
        raise UnsupportedSpecError(f"{source_name}: placeholder ${{{exc.args[0]}}} has no value in the spec "
                                   f"(params: {sorted(values)})") from None
    except ValueError as exc:
        raise UnsupportedSpecError(f"{source_name}: malformed placeholder ({exc})") from None


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def project_includes(text: str, including_file: Path, root: Path) -> list[Path]:
    """Quoted includes that resolve inside ``root`` (relative to the including file, then to root). Paths are
    normalised lexically, not resolved: resolving costs a system call per path component, on the warm path of a
    first call, and the template tree holds no symlinks that would change the answer."""
    found = []
    root_prefix = str(root) + os.sep
    for rel in _INCLUDE.findall(text):
        for base in (including_file.parent, root):
            candidate = os.path.normpath(os.path.join(base, rel))
            if candidate.startswith(root_prefix) and os.path.isfile(candidate):
                found.append(Path(candidate))
                break
    return found


@functools.lru_cache(maxsize=1024)
def _scan_header(header: Path, root: Path, mtime_ns: int, size: int) -> tuple[bytes, tuple[Path, ...]]:
    """A header's bytes and its project includes, memoised per (path, mtime, size): every spec of a process walks
    the same headers, and the walk is on the warm path of a first call."""
    del mtime_ns, size  # cache key only: an edited header is read again
    data = header.read_bytes()
    return data, tuple(project_includes(data.decode("utf-8", "replace"), header, root))


def include_closure(texts: Mapping[Path, str], root: Path) -> dict[str, bytes]:
    """Every project header reachable from the given sources: {path relative to root: contents}."""
    root = Path(os.path.abspath(root))  # lexical, like project_includes: sources and headers share this prefix
    seen: dict[str, bytes] = {}
    stack = [inc for path, text in texts.items()
             for inc in project_includes(text, Path(os.path.abspath(path)), root)]
    while stack:
        header = stack.pop()
        rel = Path(os.path.relpath(header, root)).as_posix()
        if rel in seen:
            continue
        stat = header.stat()
        seen[rel], includes = _scan_header(header, root, stat.st_mtime_ns, stat.st_size)
        stack.extend(includes)
    return dict(sorted(seen.items()))
