"""The `jitmoe` command line on a machine without a GPU."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jitmoe.cli import main
from jitmoe.jit import KernelSpec, build, load_module
from jitmoe.jit.tuning import default_store_path

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = Path(__file__).parent / "jit_templates"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JITMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_MODULES", {})
    return tmp_path / "cache"


def test_prewarm_dry_run_lists_specs_keys_and_paths(cache, capsys):
    rc = main(["prewarm", "--op", "topk_softmax", "--dtype", "bf16,fp16", "--topk", "2,8", "--arch", "80,90a",
               "-j", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if "to build" in ln]
    assert len(lines) >= 4  # at least 2 dtypes x 2 archs (top-k may share a bucket)
    assert all(str(cache) in ln and "to build" in ln for ln in lines)
    assert any("bf16" in ln for ln in lines) and any("fp16" in ln for ln in lines)
    assert any("sm90a" in ln for ln in lines) and any("sm80" in ln for ln in lines)


def test_prewarm_fp8_lists_the_e4m3_fused_moe_gemms_for_sm90a_only(cache, capsys):
    assert main(["prewarm", "--op", "fused_moe", "--dtype", "fp8", "--arch", "80,90a", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "to build" in ln]
    assert lines and all("moe_gemm_sm90ws_bf16_e4m3_" in ln and "sm90a" in ln for ln in lines)
    assert any("Swiglu_gemm1" in ln for ln in lines) and any("Identity_gemm2" in ln for ln in lines)


def test_prewarm_rejects_unknown_ops_and_dtypes(cache, capsys):
    assert main(["prewarm", "--op", "nope", "--arch", "90a", "--dry-run"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["prewarm", "--op", "topk_softmax", "--dtype", "int4", "--arch", "90a", "--dry-run"]) == 2
    assert "--dtype" in capsys.readouterr().err


def test_prewarm_quantized_modes_build_no_router_kernels(cache, capsys):
    # fp8 and int8 name the fused MoE's quantized layers, not logits dtypes
    ops = "topk_softmax,grouped_topk,omni_router,expert_choice"
    assert main(["prewarm", "--op", ops, "--dtype", "fp8,int8", "--arch", "90a", "--dry-run"]) == 0
    assert "0 specs" in capsys.readouterr().out
    assert main(["prewarm", "--op", "fused_moe,fused_moe_decode", "--dtype", "int8", "--arch", "80", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "to build" in ln]
    assert lines and all("_s8_" in ln or "moe_decode_bf16_bf16_s8" in ln for ln in lines), lines


def test_prewarm_without_gpu_needs_an_arch(cache, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["prewarm", "--op", "topk_softmax", "--dry-run"]) == 2
    assert "--arch" in capsys.readouterr().err


def test_prewarm_list_ops(capsys):
    assert main(["prewarm", "--list-ops"]) == 0
    assert "topk_softmax" in capsys.readouterr().out.split()


def test_cache_info_list_clear(cache, capsys):
    load_module(KernelSpec.create("hello", "hello", ("add.cpp",), {"offset": 1}, ["cpu"], root=TEMPLATES))
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_dir"] == str(cache) and info["entries"] == 1
    assert main(["cache", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 1 and entries[0]["spec"] == "hello_offset1_cpu" and entries[0]["size_bytes"] > 0
    # A dead build's staging dir and an entry from an older jitmoe are stale; the current entry is not.
    (cache / "tmp" / "x-1.host.999999999.abcd").mkdir(parents=True)
    old = cache / "0.0.1" / "tag" / "cpu" / "hello_old-0123456789abcdef"
    old.mkdir(parents=True)
    (old / "module.so").write_bytes(b"x")
    (old / "meta.json").write_text(json.dumps({"spec": "hello_old", "key": "k"}))
    assert main(["cache", "list", "--stale"]) == 0
    assert "hello_old" in capsys.readouterr().out
    # Tuning stores: the current version's is kept by --stale, another version's is not; a full clear drops both.
    current_store = default_store_path("fused_moe")
    old_store = cache / "tuning" / "0.0.1" / "tag" / "fused_moe.json"
    for store in (current_store, old_store):
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text('{"jitmoe_tuning": 1, "entries": {}}')
    assert main(["cache", "clear", "--stale"]) == 0
    capsys.readouterr()
    assert not old.exists() and not (cache / "tmp" / "x-1.host.999999999.abcd").exists()
    assert current_store.exists() and not old_store.exists() and not (cache / "tuning" / "0.0.1").exists()
    assert [e["spec"] for e in _list(capsys)] == ["hello_offset1_cpu"]
    assert main(["cache", "clear"]) == 0
    assert "removed 2 paths" in capsys.readouterr().out  # the module and the tuning store
    assert _list(capsys) == [] and not current_store.exists()


def _list(capsys):
    capsys.readouterr()
    main(["cache", "list", "--json"])
    return json.loads(capsys.readouterr().out)


def test_env_prints_every_variable(cache, capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    from jitmoe.env import ENV_VARS
    assert all(name in out for name in ENV_VARS)


def test_console_script_and_module_entry_point(cache):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "jitmoe", "cache", "info"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and str(cache) in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "jitmoe"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "prewarm" in proc.stdout


def test_wheel_ships_the_templates(tmp_path):
    """A non-editable install must find csrc_templates inside the package."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("jitmoe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "jitmoe/csrc_templates/common/dtypes.cuh" in names
    assert "jitmoe/csrc_templates/common/torch_binding.h" in names
    assert any(n.startswith("jitmoe/jit/") for n in names)
