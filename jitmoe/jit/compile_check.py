"""Compile a spec's CUDA sources with ``nvcc -c`` and no torch: proves templates build on a machine without a GPU
or a CUDA build of torch (CI, `jitmoe prewarm --check`). The binding, which needs torch, is not compiled."""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import arch as _arch
from .errors import JitCompileError
from .spec import KernelSpec


@dataclass
class CompiledObject:
    source: str
    object_path: str
    output: str  # everything nvcc/ptxas printed (e.g. to look for warnings such as C7510)


def compile_cuda_sources(spec: KernelSpec, out_dir: str | Path | None = None, *, ptxas_verbose: bool = False,
                         timeout: float = 1800) -> list[CompiledObject]:
    """nvcc -c every rendered ``.cu`` source of ``spec``; raises JitCompileError with the compiler output."""
    from .build import _include_dirs

    nvcc = _arch.check_toolchain(spec.archs)
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"jitmoe-check-{spec.readable_name}-"))
    out.mkdir(parents=True, exist_ok=True)
    flags = spec.resolved_flags()["cuda_cflags"]
    includes = [f"-I{d}" for d in _include_dirs(spec)]
    results = []
    for name, text in spec.rendered_sources().items():
        if not name.endswith(".cu"):
            continue
        src = out / name.replace("/", "__")
        src.write_text(text)
        obj = src.with_suffix(".o")
        cmd = [nvcc, "-std=c++17", *flags, *includes, "-Xcompiler", "-fPIC", *(["-Xptxas", "-v"] if ptxas_verbose else []),
               "-c", str(src), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        (out / f"{src.name}.log").write_text(output)
        if proc.returncode != 0:
            raise JitCompileError(spec.readable_name, " ".join(cmd), output, str(out / f"{src.name}.log"),
                                  proc.returncode)
        results.append(CompiledObject(name, str(obj), output))
    return results
