"""Quantization for ``cutlass_fused_moe``: FP8 (e4m3) per-tensor, FlashInfer's mode, and INT8 weight-only per
channel (W8A16, TensorRT-LLM's ``use_int8_woq_per_channel``): helpers that make the inputs, and the parsing of
``quant_scales``.

INT8 weight-only keeps the 16-bit input and the usual weight layouts, fc1 [E, 2I (up; gate), H] and fc2 [E, H, I],
in int8, with one scale per output channel (weight row):

    quant_scales = [fc1_scales [E_l, fc1 rows], fc2_scales [E_l, H]]   (float32 or the input's dtype)

and ``use_int8_woq_per_channel=True``; a weight row's real values are its int8 values times its scale. The layer
is the 16-bit one with those weights: GEMM2's input stays in the input's dtype.

FlashInfer's FP8 mode takes an e4m3 input, e4m3 weights and

    quant_scales = [fc1_dequant [E_l], fc2_quant (0-D, [1] or [E_l]), fc2_dequant [E_l], fc1_input_dequant (0-D)]

with fc1_dequant = w1_scale * input_scale, fc2_quant = 1 / act2_scale, fc2_dequant = w2_scale * act2_scale and
fc1_input_dequant = input_scale (a tensor's real value is its e4m3 value times its scale). The layer computes
``h = (x_q @ w1_q[e]^T) * fc1_dequant[e] + b1[e]``, ``a_q = e4m3(act(h) * fc2_quant)`` (saturating, round to
nearest even) and ``y = (a_q @ w2_q[e]^T) * fc2_dequant[e] + b2[e]``; fc1_input_dequant is already part of
fc1_dequant and is only checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .ops._validate import check_tensor
from .reference.moe import FP8_DTYPE, FP8_MAX, round_to_fp8

__all__ = ["FP8_DTYPE", "FP8_MAX", "quantize_fp8", "quantize_fp8_per_expert", "fp8_quant_scales", "Fp8Scales",
           "parse_fp8_quant_scales", "INT8_MAX", "quantize_int8_per_channel", "Int8Scales",
           "parse_int8_quant_scales"]

INT8_MAX = 127  # symmetric: -128 is never produced


def quantize_fp8(t: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): ``t`` as e4m3 with one fp32 scale (default amax / 448), so that ``q.float() * scale ~ t``.
    Values beyond the range saturate to +-448 (torch's own cast would make them NaN)."""
    check_tensor("t", t, dtypes=(torch.float32, torch.bfloat16, torch.float16), contiguous=False)
    if scale is None:
        scale = (t.detach().abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    else:
        check_tensor("scale", scale, dtypes=(torch.float32,), contiguous=False)
        if scale.numel() != 1:
            raise ValueError(f"scale: expected one value, got shape {tuple(scale.shape)}")
    scale = scale.reshape(()).to(t.device)
    return round_to_fp8(t.float() / scale), scale


def quantize_fp8_per_expert(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [E, ...] e4m3, scales float32 [E]): one scale per expert (leading dim), amax / 448 each. One expert at a
    time, so the fp32 temporaries stay the size of one expert (DeepSeek-V3's fc1 is 15 GB in bf16)."""
    check_tensor("w", w, dtypes=(torch.float32, torch.bfloat16, torch.float16), contiguous=False)
    if w.dim() < 2:
        raise ValueError(f"w: expected a tensor with a leading expert dim, got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        expert = w[e].detach().float()
        scales[e] = (expert.abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        q[e] = round_to_fp8(expert / scales[e])
    return q, scales


def fp8_quant_scales(w1_scales: torch.Tensor, w2_scales: torch.Tensor, input_scale: torch.Tensor,
                     act2_scale: torch.Tensor) -> list[torch.Tensor]:
    """FlashInfer's four-tensor ``quant_scales`` from the weight scales [E_l], the input's scale and the scale of
    GEMM2's input (the activation, e.g. its calibrated amax / 448)."""
    input_scale = input_scale.float().reshape(())
    act2_scale = act2_scale.float().reshape(())
    return [(w1_scales.float() * input_scale).contiguous(), (1.0 / act2_scale).reshape(()),
            (w2_scales.float() * act2_scale).contiguous(), input_scale]


@dataclass(frozen=True)
class Fp8Scales:
    """The parsed ``quant_scales``: what the kernels use, as contiguous fp32 1-D tensors."""

    fc1_dequant: torch.Tensor  # [E_l]
    fc2_quant: torch.Tensor    # [1] (one for all experts) or [E_l]
    fc2_dequant: torch.Tensor  # [E_l]


def _scale_tensor(name: str, t, device, lengths: tuple[int, ...]) -> torch.Tensor:
    check_tensor(name, t, dtypes=(torch.float32,), device=device)
    if t.dim() > 1 or t.numel() not in lengths:
        shapes = " or ".join("a scalar (0-D or [1])" if n == 1 else f"[{n}]" for n in lengths)
        raise ValueError(f"{name}: expected {shapes}, got shape {tuple(t.shape)}")
    return t if t.dim() == 1 else t.reshape(-1)


def _check_scale_list(quant_scales, count: int, mode: str, contents: str) -> None:
    """``quant_scales`` must be a list (or tuple) of ``count`` tensors for ``mode``."""
    if quant_scales is None:
        raise ValueError(f"quant_scales: expected {count} tensors for {mode} ({contents}), got None")
    if not isinstance(quant_scales, (list, tuple)):
        raise TypeError(f"quant_scales: expected a list of {count} tensors ({mode}: {contents}), got "
                        f"{type(quant_scales).__name__}")
    if len(quant_scales) != count:
        raise ValueError(f"quant_scales: expected {count} tensors for {mode} ({contents}), got {len(quant_scales)}")


def parse_fp8_quant_scales(quant_scales, num_local: int, device) -> Fp8Scales:
    """Validate FlashInfer's FP8 per-tensor ``quant_scales`` (see the module doc) for ``num_local`` experts."""
    _check_scale_list(quant_scales, 4, "FP8 per-tensor", "fc1_dequant, fc2_quant, fc2_dequant, fc1_input_dequant")
    fc1_dequant, fc2_quant, fc2_dequant, fc1_input_dequant = quant_scales
    per_expert = (num_local,)
    scales = Fp8Scales(_scale_tensor("quant_scales[0] (fc1_dequant)", fc1_dequant, device, per_expert),
                       _scale_tensor("quant_scales[1] (fc2_quant)", fc2_quant, device, tuple({1, num_local})),
                       _scale_tensor("quant_scales[2] (fc2_dequant)", fc2_dequant, device, per_expert))
    _scale_tensor("quant_scales[3] (fc1_input_dequant)", fc1_input_dequant, device, (1,))
    return scales


# -- INT8 weight-only per channel ------------------------------------------------------------------------------------
def quantize_int8_per_channel(w: torch.Tensor, scale_dtype: Optional[torch.dtype] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 like ``w``, scales [*w.shape[:-1]]): symmetric per-row quantization over the last dim (a weight
    row, K), scale = amax / 127 rounded to ``scale_dtype`` (default: w's dtype if 16-bit, else float32) and
    q = round(w / scale), so that ``q.float() * scale[..., None] ~ w``. One expert (leading index) at a time, so
    the fp32 temporaries stay the size of one expert."""
    check_tensor("w", w, dtypes=(torch.float32, torch.bfloat16, torch.float16), contiguous=False)
    if w.dim() < 2:
        raise ValueError(f"w: expected rows of weights (at least 2-D), got shape {tuple(w.shape)}")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype != torch.float32 else torch.float32
    elif scale_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"scale_dtype: expected float32, bfloat16 or float16, got {scale_dtype}")
    batch = w.reshape(-1, *w.shape[-2:]) if w.dim() > 2 else w.unsqueeze(0)
    q = torch.empty(batch.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(batch.shape[:-1], dtype=scale_dtype, device=w.device)
    for i in range(batch.shape[0]):
        rows = batch[i].detach().float()
        scale = (rows.abs().amax(dim=-1) / INT8_MAX).to(scale_dtype)
        # Only a scale that rounds to zero (an all-zero row, or one below the scale type's range) is replaced: a
        # floor at the type's smallest normal would shrink every fp16 row with amax < 127 * 6.1e-5.
        scales[i] = torch.where(scale == 0, torch.ones_like(scale), scale)
        q[i] = torch.round(rows / scales[i].float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(w.shape), scales.reshape(w.shape[:-1])


@dataclass(frozen=True)
class Int8Scales:
    """The parsed INT8 weight-only ``quant_scales``: per-output-channel scales, contiguous, float32 or the layer's
    dtype (the kernels read either)."""

    fc1: torch.Tensor  # [E_l, fc1 rows]
    fc2: torch.Tensor  # [E_l, H]


def parse_int8_quant_scales(quant_scales, num_local: int, fc1_rows: int, hidden: int, dtype: torch.dtype,
                            device) -> Int8Scales:
    """Validate the INT8 weight-only ``quant_scales`` (see the module doc): both in float32 or both in ``dtype``
    (the input's)."""
    _check_scale_list(quant_scales, 2, "INT8 weight-only", "fc1_scales [E_l, fc1 rows], fc2_scales [E_l, H]")
    names = ("quant_scales[0] (fc1 scales)", "quant_scales[1] (fc2 scales)")
    for name, t, shape in zip(names, quant_scales, ((num_local, fc1_rows), (num_local, hidden))):
        check_tensor(name, t, ndim=2, dtypes=(torch.float32, dtype), device=device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if quant_scales[0].dtype != quant_scales[1].dtype:
        raise TypeError(f"quant_scales: expected both scales in one dtype, got {quant_scales[0].dtype} and "
                        f"{quant_scales[1].dtype}")
    return Int8Scales(quant_scales[0], quant_scales[1])
