"""jitmoe's op registration: a real torch.library op (fake impl, torch.compile, mutation) whose first call stays
cheap (torch.library.custom_op imports torch._dynamo on the first call: seconds, measured 4.4 s on the H100 host)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from jitmoe.ops._library import custom_op

REPO = Path(__file__).resolve().parents[2]


@custom_op("jitmoe::test_scale_and_index", mutates_args=())
def scale_and_index(x: torch.Tensor, k: int, flag: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return x * (k + int(flag)), (x > 0).to(torch.int32)


@scale_and_index.register_fake
def _(x, k, flag=False):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int32)


@custom_op("jitmoe::test_write_out", mutates_args=("out",))
def write_out(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2)


@write_out.register_fake
def _(x, out):
    return None


def test_op_runs_eagerly_with_defaults_and_kwargs():
    x = torch.randn(5)
    y, i = scale_and_index(x, 3)
    assert torch.equal(y, x * 3) and torch.equal(i, (x > 0).int())
    assert torch.equal(scale_and_index(x, 3, flag=True)[0], x * 4)
    assert torch.ops.jitmoe.test_scale_and_index.default is not None


def test_fake_impl_gives_shapes_without_running():
    with FakeTensorMode():
        y, i = scale_and_index(torch.empty(3, 7), 2)
    assert y.shape == (3, 7) and i.dtype == torch.int32


def test_mutating_op_writes_in_place_and_compiles():
    x = torch.randn(6)

    def fn(x):
        out = torch.empty_like(x)
        write_out(x, out)
        return out + scale_and_index(x, 2)[0]

    expect = x * 2 + x * 2
    assert torch.allclose(fn(x), expect)
    assert torch.allclose(torch.compile(fn, backend="aot_eager", fullgraph=True)(x), expect)


def test_namespace_is_checked():
    with pytest.raises(ValueError, match="jitmoe"):
        custom_op("other::op", mutates_args=())


def test_first_call_does_not_import_dynamo():
    code = ("import sys, torch, jitmoe; x = torch.randn(8, 16); jitmoe.topk_softmax(x, 2); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_map_to_their_families_only():
    """jitmoe.<name> imports exactly the family that defines it (the map in jitmoe/__init__.py mirrors __all__)."""
    import importlib

    import jitmoe
    for family, names in jitmoe._PUBLIC.items():
        assert tuple(importlib.import_module(f"jitmoe.ops.{family}").__all__) == names
    code = ("import sys, jitmoe; jitmoe.cutlass_fused_moe; "
            "print(sorted(m for m in ('routing', 'expert_choice', 'omni_router') if 'jitmoe.ops.' + m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no_such_op"):
        jitmoe.no_such_op  # noqa: B018
