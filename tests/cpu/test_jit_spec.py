"""Spec naming, rendering and the content-hash key: stable, and sensitive to every input that changes a binary."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jitmoe.jit import KernelSpec, UnsupportedSpecError, normalize_arch
from jitmoe.jit.render import include_closure, render
from jitmoe.jit.spec import key_of, partial_key_of

TEMPLATES = Path(__file__).parent / "jit_templates"


@pytest.fixture
def root(tmp_path):
    dst = tmp_path / "templates"
    shutil.copytree(TEMPLATES, dst)
    return dst


def _spec(root, **over):
    kw = dict(name="hello", template_dir="hello", sources=("add.cpp",), params={"offset": 3}, archs=["cpu"])
    kw.update(over)
    return KernelSpec.create(kw.pop("name"), kw.pop("template_dir"), kw.pop("sources"), kw.pop("params"),
                             kw.pop("archs"), root=root, **kw)


def _key(spec, toolchain="nvcc-A"):
    return key_of(spec.key_inputs(toolchain))


def test_readable_name_spells_every_param_in_order():
    s = KernelSpec.create("topk_softmax", "routing", ("a.cu",), {"dtype": "bf16", "topk": 8, "renorm": True},
                          ["9.0a", "80"])
    assert s.readable_name == "topk_softmax_bf16_topk8_renorm_sm80_sm90a"
    assert s.archs == ("80", "90a")


def test_key_is_stable_within_and_across_processes(root):
    spec = _spec(root)
    assert _key(spec) == _key(_spec(root))
    code = ("import sys; from pathlib import Path; from jitmoe.jit import KernelSpec; from jitmoe.jit.spec import key_of;"
            f"s = KernelSpec.create('hello','hello',('add.cpp',),{{'offset':3}},['cpu'],root=Path({str(root)!r}));"
            "print(key_of(s.key_inputs('nvcc-A')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == _key(spec)


def test_key_ignores_the_template_location(root, tmp_path):
    other = tmp_path / "elsewhere"
    shutil.copytree(root, other)
    assert _key(_spec(root)) == _key(_spec(other))


@pytest.mark.parametrize("change", ["param", "source", "header", "cflags", "arch", "toolchain", "torch", "version",
                                    "python"])
def test_key_changes_with_each_input(root, monkeypatch, change):
    spec = _spec(root)
    before = _key(spec)
    toolchain = "nvcc-A"
    if change == "param":
        spec = _spec(root, params={"offset": 4})
    elif change == "source":
        (root / "hello" / "add.cpp").write_text((root / "hello" / "add.cpp").read_text() + "\n// edited\n")
    elif change == "header":
        (root / "hello" / "offset.h").write_text("#pragma once\nconstexpr int kExtra = 1;\n")
    elif change == "cflags":
        spec = _spec(root, cflags=("-DFOO",))
    elif change == "arch":
        spec = _spec(root, archs=["cpu", "80"], sources=("add.cpp",))
    elif change == "toolchain":
        spec = _spec(root, sources=("add.cpp", "k.cu"))
        (root / "hello" / "k.cu").write_text("// cuda\n")
        before = _key(spec, "nvcc 12.8")
        toolchain = "nvcc 13.0"
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "version":
        import jitmoe
        monkeypatch.setattr(jitmoe, "__version__", "9.9.9")
    elif change == "python":
        monkeypatch.setattr(sys.implementation, "cache_tag", "cpython-399")
    assert _key(spec, toolchain) != before


def test_partial_key_ignores_only_the_toolchain(root):
    spec = _spec(root)
    a, b = spec.key_inputs("nvcc 12.8"), spec.key_inputs("nvcc 13.0")
    assert partial_key_of(a) == partial_key_of(b)


def test_render_is_strict_and_escapes_dollars():
    assert render("x=${a}; y=$$z; b=${b}", {"a": 1, "b": True}) == "x=1; y=$z; b=true"
    with pytest.raises(UnsupportedSpecError, match=r"\$\{missing\}"):
        render("int x = ${missing};", {"a": 1})


def test_rendered_sources_and_include_closure(root):
    text = _spec(root).rendered_sources()["add.cpp"]
    assert "x + 3 + kExtra" in text
    headers = include_closure({root / "hello" / "add.cpp": text}, root)
    assert list(headers) == ["hello/offset.h"]  # <pybind11/...> is a system header: not hashed


def test_missing_template_is_reported(root):
    with pytest.raises(UnsupportedSpecError, match="does not exist"):
        _spec(root, sources=("nope.cpp",)).rendered_sources()


@pytest.mark.parametrize("bad", [{"offset": 1.5}, {"offset": None}])
def test_param_types_are_checked(root, bad):
    with pytest.raises(UnsupportedSpecError, match="offset"):
        _spec(root, params=bad)


@pytest.mark.parametrize("raw,want", [("9.0a", "90a"), ("sm_80", "80"), ("90a", "90a"), ("cpu", "cpu")])
def test_normalize_arch(raw, want):
    assert normalize_arch(raw) == want


def test_arch_list_variable_is_read_on_every_call(monkeypatch):
    """device_archs reads JITMOE_CUDA_ARCH_LIST each time (its parse is cached per value, not the value)."""
    from jitmoe.jit import device_archs
    monkeypatch.setenv("JITMOE_CUDA_ARCH_LIST", "8.0;9.0a")
    assert device_archs(torch.device("cuda", 0)) == ("80", "90a")
    monkeypatch.setenv("JITMOE_CUDA_ARCH_LIST", "sm_90a")
    assert device_archs(torch.device("cuda", 0)) == ("90a",)
    assert device_archs(0) == ("90a",) and device_archs("cuda:0") == ("90a",)


def test_normalize_arch_rejects_garbage():
    with pytest.raises(ValueError, match="arch"):
        normalize_arch("hopper")


def test_spec_roundtrips_through_dict(root):
    spec = _spec(root, cflags=("-DX",))
    assert KernelSpec.from_dict(spec.to_dict()) == spec
