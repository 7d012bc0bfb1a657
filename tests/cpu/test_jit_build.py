"""The build path, for real, with a small host-only template: cold build, warm load without ninja, racing
processes, a killed build, a read-only cache, a corrupt artifact and a compile error."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jitmoe.jit import JitCompileError, KernelSpec, MissingKernelError, ToolchainError, build, load_module

TEMPLATES = Path(__file__).parent / "jit_templates"
REPO = Path(__file__).resolve().parents[2]


def hello_spec(offset: int, source: str = "add.cpp") -> KernelSpec:
    return KernelSpec.create("hello", "hello", (source,), {"offset": offset}, ["cpu"], root=TEMPLATES)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JITMOE_CACHE_DIR", str(root))
    monkeypatch.setattr(build, "_MODULES", {})
    monkeypatch.setattr(build, "STATS", dict.fromkeys(build.STATS, 0))
    return root


def run_loader(cache_root: Path, offset: int, prelude: str = "", wait_for: Path | None = None, **popen):
    """A fresh process that loads hello(offset) and prints its stats; returns the Popen."""
    code = prelude + textwrap.dedent(f"""
        import json, os, sys, time
        from pathlib import Path
        wait_for = {str(wait_for) if wait_for else None!r}
        while wait_for and not os.path.exists(wait_for):
            time.sleep(0.01)
        from jitmoe.jit import KernelSpec, load_module, build
        spec = KernelSpec.create("hello", "hello", ("add.cpp",), {{"offset": {offset}}}, ["cpu"],
                                 root=Path({str(TEMPLATES)!r}))
        result = load_module(spec).add_offset(10)
        print(json.dumps({{"result": result, **build.STATS}}))
    """)
    env = {**os.environ, "JITMOE_CACHE_DIR": str(cache_root), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **popen)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_cold_build_publishes_a_complete_entry_then_loads_warm(cache):
    spec = hello_spec(1)
    assert load_module(spec).add_offset(10) == 11
    assert build.STATS["built"] == 1
    entry = build.resolve(spec)
    assert {p.name for p in entry.dir.iterdir()} == {"module.so", "meta.json", "build.log"}
    meta = json.loads((entry.dir / "meta.json").read_text())
    assert meta["key"] == entry.key and meta["module_name"] == entry.module_name
    assert entry.lock_path.exists()  # lock files are never deleted
    assert not any((cache / "tmp").iterdir())  # staging cleaned up
    # A second process takes the warm path.
    stats = finish(run_loader(cache, 1))
    assert stats == {**stats, "result": 11, "built": 0, "warm": 1}


def test_warm_path_runs_no_build_tool(cache):
    load_module(hello_spec(1))
    # In a fresh process, any attempt to build (cpp_extension.load, ninja or any subprocess) explodes.
    prelude = textwrap.dedent("""
        import subprocess, torch.utils.cpp_extension as ce
        def boom(*a, **k): raise AssertionError("a build tool was invoked on the warm path")
        ce.load = boom; subprocess.Popen = boom; subprocess.run = boom
    """)
    stats = finish(run_loader(cache, 1, prelude=prelude))
    assert stats["result"] == 11 and stats["warm"] == 1 and stats["built"] == 0


def test_eight_processes_racing_on_one_cold_key_build_once(cache, tmp_path):
    go = tmp_path / "go"
    procs = [run_loader(cache, 2, wait_for=go) for _ in range(8)]
    time.sleep(3)  # let every process import torch and reach the start line
    go.write_text("")
    results = [finish(p) for p in procs]
    assert [r["result"] for r in results] == [12] * 8
    assert sum(r["built"] for r in results) == 1
    assert sum(r["warm"] for r in results) == 7


def test_a_build_killed_midway_leaves_the_cache_usable(cache):
    proc = run_loader(cache, 3, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache / "tmp").glob("hello_offset3*/build")):
        time.sleep(0.05)
    assert list((cache / "tmp").glob("hello_offset3*/build")), "the build never started"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its compiler children
    proc.communicate()
    assert not (build.resolve(hello_spec(3)).dir / "meta.json").exists()
    assert load_module(hello_spec(3)).add_offset(10) == 13
    assert build.STATS["built"] == 1


def test_read_only_cache_builds_in_a_temp_dir_with_a_warning(cache, monkeypatch):
    monkeypatch.setattr(build, "_writable", lambda root: False)
    monkeypatch.setattr(build, "_READONLY_WARNED", set())
    with pytest.warns(RuntimeWarning, match="not writable"):
        assert load_module(hello_spec(4)).add_offset(10) == 14
    assert not build.resolve(hello_spec(4)).dir.exists()


def test_truncated_module_is_rebuilt(cache):
    load_module(hello_spec(1))
    so = build.resolve(hello_spec(1)).dir / "module.so"
    so.write_bytes(so.read_bytes()[:100])
    stats = finish(run_loader(cache, 1))  # a fresh process: this one still has the good module mapped
    assert stats["result"] == 11 and stats["built"] == 1
    assert so.stat().st_size > 1000


def test_compile_error_carries_the_compiler_message(cache):
    with pytest.raises(JitCompileError) as info:
        load_module(hello_spec(5, source="broken.cpp"))
    err = info.value
    assert err.first_error and "error" in err.first_error and "broken.cpp" in err.first_error
    assert "broken.cpp" in err.command
    assert Path(err.log_path).is_file()
    assert "first error" in str(err) and err.log_path in str(err)


def test_disable_jit_turns_a_miss_into_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("JITMOE_DISABLE_JIT", "1")
    with pytest.raises(MissingKernelError, match="jitmoe prewarm"):
        load_module(hello_spec(6))


def test_missing_nvcc_is_reported_before_building(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("JITMOE_NVCC", str(tmp_path / "no-nvcc"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    spec = KernelSpec.create("hello", "hello", ("add.cpp", "k.cu"), {"offset": 1}, ["80"], root=tmp_path / "t")
    (tmp_path / "t" / "hello").mkdir(parents=True)
    for name in ("add.cpp", "k.cu"):
        (tmp_path / "t" / "hello" / name).write_text("// ${offset}\n")
    with pytest.raises(ToolchainError, match="nvcc not found"):
        load_module(spec)
