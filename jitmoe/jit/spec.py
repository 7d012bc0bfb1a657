"""KernelSpec: a template plus its parameters -> a readable module name and a content-hash key.

The key hashes everything that can change the binary (rendered sources, the project headers they include, every
flag, the compiler release, target archs, torch/CUDA/Python ABI, jitmoe version) and nothing that cannot (paths,
CUDA_HOME, mtimes). Ops build specs; this module knows nothing about what the kernels compute.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .. import env
from . import arch as _arch
from .errors import UnsupportedSpecError
from .render import include_closure, render

KEY_SCHEMA = 1
_NAME_TOKEN = re.compile(r"[^0-9A-Za-z]+")


def default_template_root() -> Path:
    """Templates ship inside the wheel as jitmoe/csrc_templates; a source checkout keeps them at the top level."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg / "csrc_templates", pkg.parent / "csrc_templates"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"csrc_templates not found next to {pkg}")


@dataclass(frozen=True)
class KernelSpec:
    """One specialization of one template folder.

    name:          the op name, first token of the module name (e.g. 'topk_softmax').
    template_dir:  folder under the template root that holds ``sources``.
    sources:       template files rendered into the build (``.cu`` -> nvcc, ``.cpp`` -> host compiler).
    params:        ordered (name, value) pairs: rendered as ``${name}`` and spelled out in the module name.
    archs:         sorted target archs ('80', '90a', ...) or ('cpu',) for host-only modules.
    cutlass:       add the CUTLASS/CuTe include dirs (their version joins the key).
    root:          template root; None means the package's csrc_templates (never part of the key).
    """

    name: str
    template_dir: str
    sources: tuple[str, ...]
    params: tuple[tuple[str, object], ...]
    archs: tuple[str, ...]
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    cutlass: bool = False
    root: Path | None = field(default=None, compare=False, repr=False)

    @classmethod
    def create(cls, name: str, template_dir: str, sources, params: Mapping[str, object], archs, **kw) -> "KernelSpec":
        for k, v in params.items():
            if not isinstance(v, (str, int, bool)):
                raise UnsupportedSpecError(f"spec {name}: param {k!r} must be str/int/bool, got {type(v).__name__}")
        norm = tuple(sorted({_arch.normalize_arch(a) for a in archs}))
        if not norm:
            raise UnsupportedSpecError(f"spec {name}: at least one arch is required")
        return cls(name, template_dir, tuple(sources), tuple(params.items()), norm, **kw)

    def to_dict(self) -> dict:
        """Plain fields (no root) so `jitmoe cache list` can rebuild the spec and tell whether it is stale."""
        return {"name": self.name, "template_dir": self.template_dir, "sources": list(self.sources),
                "params": [list(p) for p in self.params], "archs": list(self.archs), "cflags": list(self.cflags),
                "cuda_cflags": list(self.cuda_cflags), "ldflags": list(self.ldflags), "cutlass": self.cutlass}

    @classmethod
    def from_dict(cls, d: Mapping) -> "KernelSpec":
        return cls(d["name"], d["template_dir"], tuple(d["sources"]), tuple((k, v) for k, v in d["params"]),
                   tuple(d["archs"]), tuple(d["cflags"]), tuple(d["cuda_cflags"]), tuple(d["ldflags"]),
                   bool(d["cutlass"]))

    # -- naming ---------------------------------------------------------------------------------------------
    @property
    def has_cuda(self) -> bool:
        return any(s.endswith(".cu") for s in self.sources)

    @property
    def arch_tag(self) -> str:
        return "_".join(a if a == "cpu" else f"sm{a}" for a in self.archs)

    @property
    def readable_name(self) -> str:
        tokens = [self.name]
        for k, v in self.params:
            if isinstance(v, bool):
                tokens.append(k if v else f"no{k}")
            elif isinstance(v, str):
                tokens.append(v)
            else:
                tokens.append(f"{k}{v}")
        tokens.append(self.arch_tag)
        return _NAME_TOKEN.sub("_", "_".join(tokens)).strip("_")

    @property
    def template_root(self) -> Path:
        return Path(self.root) if self.root is not None else default_template_root()

    # -- content --------------------------------------------------------------------------------------------
    def rendered_sources(self) -> dict[str, str]:
        folder = self.template_root / self.template_dir
        out = {}
        for src in self.sources:
            path = folder / src
            if not path.is_file():
                raise UnsupportedSpecError(f"spec {self.name}: template {path} does not exist")
            out[src] = render(path.read_text(), dict(self.params), source_name=str(path))
        return out

    def resolved_flags(self) -> dict[str, list[str]]:
        """Every flag the build uses (defaults, spec flags, env extras), in order. Part of the key."""
        dbg = env.debug()
        opt = ["-O0", "-g"] if dbg else ["-O3", "-DNDEBUG"]
        # No -std here: torch picks the standard its own headers need (C++17 or newer); our code is C++17.
        cflags = [*opt, *self.cflags]
        cuda = [*opt, "--expt-relaxed-constexpr",
                # torch disables the half/bf16 operators by default; our kernels and CUTLASS want them.
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                *(["-lineinfo"] if dbg else []), *self.cuda_cflags, *env.extra_cuda_cflags(),
                *_arch.gencode_flags(self.archs)]
        return {"cflags": cflags, "cuda_cflags": cuda if self.has_cuda else [], "ldflags": list(self.ldflags)}

    def include_dirs(self) -> list[str]:
        dirs = [str(self.template_root)]
        if self.cutlass:
            root = _arch.cutlass_root()
            dirs += [str(root / "include"), str(root / "tools" / "util" / "include")]
        return dirs

    def key_inputs(self, toolchain: str | None) -> dict:
        """Everything hashed into the key. ``toolchain`` is nvcc's release line (None for host-only specs)."""
        import torch

        from .. import __version__
        sources = self.rendered_sources()
        folder = self.template_root / self.template_dir
        headers = include_closure({folder / k: v for k, v in sources.items()}, self.template_root)
        return {
            "schema": KEY_SCHEMA,
            "jitmoe": __version__,
            "name": self.readable_name,
            "sources": {k: _sha(v.encode()) for k, v in sources.items()},
            "headers": {k: _sha(v) for k, v in headers.items()},
            "flags": self.resolved_flags(),
            "archs": list(self.archs),
            "toolchain": toolchain if self.has_cuda else "host",
            "cutlass": _arch.cutlass_version(_arch.cutlass_root()) if self.cutlass else None,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "python": sys.implementation.cache_tag + getattr(sys, "abiflags", ""),
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        }


def key_of(inputs: Mapping) -> str:
    return _sha(json.dumps(inputs, sort_keys=True).encode())


def partial_key_of(inputs: Mapping) -> str:
    """The key without the toolchain: finds a prebuilt module on a machine that has no nvcc."""
    return key_of({k: v for k, v in inputs.items() if k != "toolchain"})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
