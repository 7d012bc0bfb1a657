"""Input validation shared by the ops: errors name the argument, what was expected and what was given."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_TAG = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def float_tags(tags) -> list[str]:
    """The prewarm dtype tags that name a tensor type (fp32, bf16, fp16); 'fp8' and 'int8' name the fused MoE's
    quantized modes and build nothing for the routers."""
    return [t for t in tags if t in DTYPE_TAG.values()]


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 contiguous: bool = True, device: torch.device | None = None, min_rows: int | None = None) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor with the given properties."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if min_rows is not None and t.dim() >= 1 and t.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} rows, got {t.shape[0]}")


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An int in [low, high]; bools are rejected (True is not a top-k)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name}: expected >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected <= {high}, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
