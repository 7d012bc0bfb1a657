"""Register jitmoe ops with torch.library, without torch.library.custom_op's first-call cost.

custom_op wraps each kernel in torch._dynamo.disable, whose first call imports torch._dynamo: 4.4 s on the H100
machine (measured), against a 50 ms budget for a warm first call. We define the schema and register the kernel
through the lower-level torch.library.Library, which adds no wrapper, and keep register_fake/register_autograd, so
torch.compile, fake tensors and CUDA graphs see an ordinary custom op.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

_LIB = torch.library.Library("jitmoe", "FRAGMENT")


class Op:
    """A registered op: call it like the function it wraps (dispatches through torch.ops.jitmoe.<name>)."""

    def __init__(self, qualname: str, fn: Callable):
        self.qualname = qualname
        self._fn = fn
        self._overload = getattr(getattr(torch.ops.jitmoe, qualname.split("::")[1]), "default")
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, *args, **kwargs):
        return self._overload(*args, **kwargs)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.qualname, lib=_LIB)(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)


def custom_op(qualname: str, *, mutates_args: Iterable[str] | str = ()) -> Callable[[Callable], Op]:
    """Drop-in for ``torch.library.custom_op`` (same schema inference) for one device-dispatching Python kernel."""
    namespace, name = qualname.split("::")
    if namespace != "jitmoe":
        raise ValueError(f"qualname: expected the 'jitmoe' namespace, got {qualname!r}")

    def register(fn: Callable) -> Op:
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        _LIB.define(name + schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return Op(qualname, fn)

    return register
