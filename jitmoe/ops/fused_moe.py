"""cutlass_fused_moe: a drop-in for FlashInfer's function of the same name (signature, defaults, layouts, return).

The public function is a thin adapter: it rejects the modes we do not implement, validates, and maps the call onto
a typed ``MoeConfig``; the pipeline runs as one ``torch.library`` op (``jitmoe::fused_moe``) so torch.compile and
CUDA graphs see a single opaque call. On CUDA:

    moe_align (expert-sorted, tile-padded rows) -> GEMM1 (+ fc1 bias, activation) -> GEMM2 (+ fc2 bias, x weight)
    -> moe_combine (sum over the top-k in fixed order)

and for a few tokens (``moe_decode.use_decode``) the decode path: one weight-streaming launch per GEMM, GEMM2
summing each token's choices itself.

FP8 per-tensor (FlashInfer's mode: e4m3 input and weights, four ``quant_scales``; jitmoe.quant) runs the same
pipeline on sm_90a with e4m3 GEMMs (or the decode path with e4m3 operands), GEMM1 writing GEMM2's input in e4m3;
no split-K or autotune there. INT8 weight-only (TensorRT-LLM's ``use_int8_woq_per_channel``: 16-bit input, int8
weights in the usual layouts, per-channel scales; jitmoe.quant) runs the decode path with int8 weight rows, or
grouped GEMMs converting int8 weight tiles to 16 bits in shared memory: sm90ws on sm_90a, sm80 elsewhere (from SM80
on); no split-K on sm90ws and no autotune.

Everything is deterministic: no float atomics anywhere, so ``use_fused_finalize`` True and False give bitwise
repeatable (and identical) results. Out-of-range expert ids contribute zero on CUDA (no device check: that would
need a host sync); the CPU path, which runs the fp32 reference, raises ValueError for them.
"""
from __future__ import annotations

import contextlib
import enum
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .. import quant as _quant
from ..jit.arch import device_archs
from ..reference import moe as _ref
from . import moe_autotune as _autotune
from . import moe_decode as _decode
from . import moe_gemm as _gemm
from . import permute as _permute
from ._library import custom_op
from ._validate import check_int, check_tensor

__all__ = ["cutlass_fused_moe", "ActivationType", "autotune"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
FP8 = _quant.FP8_DTYPE  # FP8 per-tensor mode: input and both weights in e4m3
_SWIGLU_PARAMS = {"SwigluBias": ("swiglu_alpha", "swiglu_beta", "swiglu_limit"), "SwigluStep": ("swiglu_limit",)}


class ActivationType(enum.IntEnum):
    """FlashInfer's activation enum (HEAD numbering; match by name across versions, the values were renumbered)."""

    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3
    Geglu = 4
    SwigluBias = 5
    Relu2 = 6
    SwigluStep = 7
    GegluTanh = 8
    Identity = 9
    Situ = 10
    InvalidType = 11

    @property
    def is_gated(self) -> bool:
        """Gated activations read fc1 as [E, 2I, H] (up rows, then gate rows); the others as [E, I, H]."""
        return self.name in _ref.GATED_ACTIVATIONS


@contextlib.contextmanager
def autotune(tune_mode: bool = True, cache: Optional[str] = None, tuning_buckets=None, round_up=None,
             skip_ops=None):
    """FlashInfer's ``autotune`` context. With ``tune_mode`` True, every CUDA ``cutlass_fused_moe`` call inside it
    whose problem (arch, dtype, gated, H, I, E_local, top-k, tokens rounded up to a power of two) has no stored
    choice times the GEMM tile candidates on its own inputs (synchronising the device; configs not built before
    cost 20-30 s of JIT build each), stores the fastest in memory and in the JIT cache (``<cache>/tuning/``), and
    runs with it; with ``tune_mode`` False it only looks up. ``cache``: a JSON file whose choices are loaded on
    entry (if it exists) and to which every choice is saved on exit (when ``tune_mode`` is True). Outside the
    context stored choices are used, else the heuristic; ``JITMOE_TUNING=0`` turns both off. Calls captured in a
    CUDA graph or traced by torch.compile never tune. ``tuning_buckets``, ``round_up`` and ``skip_ops`` are
    accepted and ignored (the token buckets are powers of two; there is one op). See ``moe_autotune``."""
    with _autotune.session(tune_mode, cache):
        yield


DECODE = "decode"  # force_kernel's name for the decode path (moe_decode)
PATHS = (*_gemm.KERNELS, DECODE)
_forced_kernel = ""  # '' (heuristic) or one of PATHS; a plain global so torch.compile can guard on it
_forced_split_k = 0  # 0 (heuristic) or the K slices of both GEMMs


@contextlib.contextmanager
def force_kernel(kernel: Optional[str]):
    """Run the layer on one kernel family inside the context: a grouped-GEMM kernel ('sm80', 'sm90' or 'sm90ws'),
    e.g. the SM80 kernels on an H100 to test them, or 'decode' (the decode path at any token count it fits). None
    restores the heuristic. For tests and benchmarks; not thread-safe."""
    global _forced_kernel
    if kernel is not None and kernel not in PATHS:
        raise ValueError(f"kernel: expected None or one of {PATHS}, got {kernel!r}")
    previous, _forced_kernel = _forced_kernel, kernel or ""
    try:
        yield
    finally:
        _forced_kernel = previous


@contextlib.contextmanager
def force_split_k(k_splits: Optional[int]):
    """Run both grouped GEMMs with ``k_splits`` K slices inside the context (1: no split); None restores the
    heuristic (``moe_gemm.split_k_for``). For the split-K sweep of the benchmark and for tests; not thread-safe."""
    global _forced_split_k
    if k_splits is not None:
        check_int("k_splits", k_splits, low=1, high=_gemm.MAX_K_SPLITS)
    previous, _forced_split_k = _forced_split_k, k_splits or 0
    try:
        yield
    finally:
        _forced_split_k = previous


@dataclass(frozen=True)
class MoeConfig:
    """What one cutlass_fused_moe call computes, in jitmoe's terms (the adapter builds it from FlashInfer's args)."""

    num_tokens: int
    hidden: int
    inter: int
    topk: int
    num_local_experts: int
    activation: ActivationType  # effective: Swiglu with swiglu_* parameters is SwigluBias
    dtype: torch.dtype = torch.bfloat16  # the output's (and biases') type: the input's, or FP8's output_dtype
    ep_size: int = 1
    ep_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def num_experts(self) -> int:
        return self.num_local_experts * self.ep_size

    @property
    def local_expert_offset(self) -> int:
        return self.ep_rank * self.num_local_experts

    @property
    def apply_fc2_bias(self) -> bool:
        return self.tp_rank == 0  # TP shards sum their outputs: the bias must be added once


@dataclass
class MoeTensors:
    """The tensors of one call, named as the kernels see them."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    scales: Optional[torch.Tensor]
    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: Optional[torch.Tensor] = None
    fc2_bias: Optional[torch.Tensor] = None
    swiglu_alpha: Optional[torch.Tensor] = None
    swiglu_beta: Optional[torch.Tensor] = None
    swiglu_limit: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    fp8: Optional[_quant.Fp8Scales] = None  # FP8 per-tensor mode: the parsed quant_scales
    int8_woq: bool = False  # INT8 weight-only per channel (use_int8_woq_per_channel)
    int8: Optional[_quant.Int8Scales] = None  # ... its parsed quant_scales

    @property
    def is_fp8(self) -> bool:
        return self.x.dtype == FP8

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.int8 if self.int8_woq else self.x.dtype


# -- unsupported modes -----------------------------------------------------------------------------------------------
_UNSUPPORTED_FLAGS = {
    "use_deepseek_fp8_block_scale": "DeepSeek FP8 block-scale quantization",
    "use_w4_group_scaling": "W4 group scaling (W4A8 / MXFP4 W4A16)",
    "use_mxfp8_act_scaling": "MXFP8 activation scaling",
    "min_latency_mode": "min-latency mode",
    "use_packed_weights": "packed 4-bit weights (INT4 W4A16 / W4A8)",
    "use_wfp4afp8_humming": "Humming MXFP4-weight x FP8-activation",
}
_UNSUPPORTED_DTYPES = {
    torch.float8_e5m2: "FP8 (e5m2)", torch.uint8: "packed FP4/INT4 (uint8: NVFP4, MXFP4, W4A16, W4A8)",
    torch.int64: "packed FP4 (int64: NVFP4/MXFP4)",
}


def _not_implemented(what: str) -> NotImplementedError:
    return NotImplementedError(f"cutlass_fused_moe: {what} is not implemented in jitmoe (bf16/fp16, FP8 per-tensor "
                               "with e4m3 input and weights, and INT8 weight-only per channel)")


def _check_int8_flag(int8_woq, tensors: dict) -> None:
    """use_int8_woq_per_channel and int8 weights come together (TensorRT-LLM's flag; FlashInfer has none)."""
    if not isinstance(int8_woq, bool):
        raise TypeError(f"use_int8_woq_per_channel: expected a bool, got {type(int8_woq).__name__}")
    for name in ("fc1_expert_weights", "fc2_expert_weights"):
        t = tensors[name]
        if isinstance(t, torch.Tensor) and (t.dtype == torch.int8) != int8_woq:
            if int8_woq:
                raise TypeError(f"{name}: expected int8 weights with use_int8_woq_per_channel=True, got "
                                f"{str(t.dtype).replace('torch.', '')}")
            raise TypeError(f"{name}: int8 weights need use_int8_woq_per_channel=True (INT8 weight-only per channel,"
                            " with quant_scales = [fc1_scales, fc2_scales])")


def _reject_unsupported(*, quant_scales, input_sf, cluster_size, enable_alltoall, ep_size, situ_beta,
                        situ_linear_beta, flags: dict, tensors: dict, int8_woq: bool = False) -> None:
    """NotImplementedError naming the mode for everything FlashInfer has and jitmoe does not (yet)."""
    for flag, description in _UNSUPPORTED_FLAGS.items():
        if flags.get(flag):
            raise _not_implemented(f"{flag}=True ({description})")
    _check_int8_flag(int8_woq, tensors)
    fp8 = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.dtype == FP8]
    if fp8 and len(fp8) != len(tensors) and not int8_woq:  # INT8 weight-only: the input check names the input
        raise _not_implemented(f"{', '.join(fp8)} in float8_e4m3fn with {', '.join(n for n in tensors if n not in fp8)}"
                               " in other dtypes (FP8 per-tensor needs all three in e4m3)")
    if not fp8 and not int8_woq and quant_scales is not None and len(quant_scales) > 0:
        raise _not_implemented(f"quant_scales with {len(quant_scales)} tensors for a 16-bit input and weights "
                               "(NVFP4/MXFP4/W4A8 modes); pass None or [] (FP8 per-tensor takes an e4m3 input, INT8 "
                               "weight-only int8 weights and use_int8_woq_per_channel=True)")
    if input_sf is not None:
        raise _not_implemented("input_sf (NVFP4/MXFP8 input scale factors)")
    if cluster_size != 1:
        raise _not_implemented(f"cluster_size={cluster_size} (only 1)")
    if enable_alltoall and ep_size > 1:
        raise _not_implemented("enable_alltoall=True with ep_size > 1 (rows without a local expert left unwritten)")
    if situ_beta is not None or situ_linear_beta is not None:
        raise _not_implemented("situ_beta/situ_linear_beta (Situ runs with FlashInfer's defaults 4.0/25.0)")
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.dtype in _UNSUPPORTED_DTYPES:
            raise _not_implemented(f"{name} of dtype {str(t.dtype).replace('torch.', '')} "
                                   f"({_UNSUPPORTED_DTYPES[t.dtype]})")


# -- validation ------------------------------------------------------------------------------------------------------
def _activation(value) -> ActivationType:
    """An ActivationType from ours, FlashInfer's (matched by name: its numbering changed) or an int/name."""
    name = getattr(value, "name", value if isinstance(value, str) else None)
    if isinstance(name, str) and name in ActivationType.__members__:
        act = ActivationType[name]
    elif isinstance(value, int) and not isinstance(value, bool) and value in ActivationType._value2member_map_:
        act = ActivationType(value)
    elif isinstance(value, (int, str, enum.Enum)):
        raise ValueError(f"activation_type: expected an ActivationType, got {value!r}")
    else:
        raise TypeError(f"activation_type: expected an ActivationType, got {type(value).__name__}")
    if act is ActivationType.InvalidType:
        raise ValueError("activation_type: expected a valid activation, got ActivationType.InvalidType")
    return act


def _check_parallel(tp_size, tp_rank, ep_size, ep_rank, cluster_rank) -> None:
    check_int("tp_size", tp_size, low=1)
    check_int("tp_rank", tp_rank, low=0, high=tp_size - 1)
    check_int("ep_size", ep_size, low=1)
    check_int("ep_rank", ep_rank, low=0, high=ep_size - 1)
    check_int("cluster_rank", cluster_rank, low=0, high=0)


def _check_input(t: MoeTensors, output_dtype) -> torch.dtype:
    """The input and output_dtype; returns the layer's (output's) dtype."""
    check_tensor("input", t.x, ndim=2, dtypes=SUPPORTED_DTYPES if t.int8_woq else (*SUPPORTED_DTYPES, FP8))
    if not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"output_dtype: expected a torch.dtype, got {type(output_dtype).__name__}")
    if t.is_fp8 and output_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"output_dtype: expected bfloat16/float16 with an FP8 input, got {output_dtype}")
    if not t.is_fp8 and output_dtype != t.x.dtype:
        raise TypeError(f"output_dtype: expected {t.x.dtype} (the input's dtype: unquantized runs store in it), "
                        f"got {output_dtype}")
    _check_row_multiple("input: expected a hidden size", t.x.shape[1], t)
    return output_dtype


def _check_row_multiple(what: str, size: int, t: MoeTensors) -> None:
    """Rows are moved in 16-byte vectors: 8 elements of 16 bits, 16 of FP8 or int8 (FlashInfer's own alignment
    rule)."""
    multiple = 16 if t.is_fp8 or t.int8_woq else 8
    if size % multiple:
        raise ValueError(f"{what} that is a multiple of {multiple}, got {size}")


def _check_weights(t: MoeTensors, gated: bool) -> tuple[int, int]:
    """fc1 [E_l, 2I or I, H], fc2 [E_l, H, I] in the input's dtype (int8 for INT8 weight-only); returns (E_l, I)."""
    x = t.x
    check_tensor("fc1_expert_weights", t.fc1, ndim=3, dtypes=(t.weight_dtype,), device=x.device)
    check_tensor("fc2_expert_weights", t.fc2, ndim=3, dtypes=(t.weight_dtype,), device=x.device)
    num_local, hidden, inter = t.fc2.shape
    if hidden != x.shape[1] or num_local < 1:
        raise ValueError(f"fc2_expert_weights: expected shape [E_l >= 1, {x.shape[1]} (hidden), I], "
                         f"got {tuple(t.fc2.shape)}")
    _check_row_multiple("fc2_expert_weights: expected an intermediate size", inter, t)
    rows = 2 * inter if gated else inter
    if tuple(t.fc1.shape) != (num_local, rows, hidden):
        layout = "[E_l, 2I (up; gate), H]" if gated else "[E_l, I, H] (non-gated)"
        raise ValueError(f"fc1_expert_weights: expected {layout} = {[num_local, rows, hidden]} to match "
                         f"fc2_expert_weights {tuple(t.fc2.shape)}, got {tuple(t.fc1.shape)}")
    return num_local, inter


def _check_routing(t: MoeTensors, num_experts: int) -> int:
    """ids int32 [T, k] with 1 <= k <= num_experts, scales float32 [T, k] or None; returns k."""
    x = t.x
    check_tensor("token_selected_experts", t.topk_ids, ndim=2, dtypes=(torch.int32,), device=x.device)
    num_tokens, topk = t.topk_ids.shape
    if num_tokens != x.shape[0] or topk < 1:
        raise ValueError(f"token_selected_experts: expected shape [{x.shape[0]} (tokens), top_k >= 1], "
                         f"got {tuple(t.topk_ids.shape)}")
    if topk > num_experts:
        raise ValueError(f"token_selected_experts: expected top_k <= {num_experts} (the number of experts, "
                         f"E_l * ep_size), got top_k = {topk}")
    if t.scales is not None:
        check_tensor("token_final_scales", t.scales, ndim=2, dtypes=(torch.float32,), device=x.device)
        if t.scales.shape != t.topk_ids.shape:
            raise ValueError(f"token_final_scales: expected shape {tuple(t.topk_ids.shape)} (as "
                             f"token_selected_experts), got {tuple(t.scales.shape)}")
    return topk


def _check_biases(t: MoeTensors, num_local: int, fc1_rows: int, dtype: torch.dtype) -> None:
    """Both biases or neither: fc1 [E_l, fc1 rows], fc2 [E_l, H], in the layer's dtype."""
    if (t.fc1_bias is None) != (t.fc2_bias is None):
        given, missing = (("fc1", "fc2") if t.fc2_bias is None else ("fc2", "fc1"))
        raise ValueError(f"{missing}_expert_biases: expected a tensor because {given}_expert_biases is given "
                         "(FlashInfer takes both biases or neither), got None")
    if t.fc1_bias is None:
        return
    x = t.x
    for name, bias, width in (("fc1_expert_biases", t.fc1_bias, fc1_rows), ("fc2_expert_biases", t.fc2_bias,
                                                                             x.shape[1])):
        check_tensor(name, bias, ndim=2, dtypes=(dtype,), device=x.device)
        if tuple(bias.shape) != (num_local, width):
            raise ValueError(f"{name}: expected shape {(num_local, width)}, got {tuple(bias.shape)}")


def _check_per_expert(t: MoeTensors, num_local: int) -> None:
    for name in ("swiglu_alpha", "swiglu_beta", "swiglu_limit"):
        value = getattr(t, name)
        if value is not None:
            check_tensor(name, value, ndim=1, dtypes=(torch.float32,), device=t.x.device)
            if value.shape[0] != num_local:
                raise ValueError(f"{name}: expected {num_local} values (one per local expert), got {value.shape[0]}")


def _check_output(t: MoeTensors, dtype: torch.dtype) -> None:
    if t.output is None:
        return
    check_tensor("output", t.output, ndim=2, dtypes=(dtype,), device=t.x.device)
    if t.output.shape != t.x.shape:
        raise ValueError(f"output: expected shape {tuple(t.x.shape)}, got {tuple(t.output.shape)}")


def _check_alignment(t: MoeTensors) -> None:
    """The GEMMs load 16-byte vectors: CUDA bases must be 16-byte aligned (torch allocations are)."""
    if not t.x.is_cuda:
        return
    for name, tensor in (("input", t.x), ("fc1_expert_weights", t.fc1), ("fc2_expert_weights", t.fc2)):
        if tensor.data_ptr() % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned data pointer, got address {tensor.data_ptr():#x}")


def _check_workspace(workspace_buffer, device) -> None:
    """Validated like FlashInfer's (1-D, contiguous, int8/uint8, on the input's device), then unused: jitmoe's
    scratch comes from torch's caching allocator, which CUDA graphs capture."""
    if workspace_buffer is not None:
        check_tensor("workspace_buffer", workspace_buffer, ndim=1, dtypes=(torch.uint8, torch.int8), device=device)


def _check_fp8(t: MoeTensors, quant_scales, num_local: int) -> None:
    """FP8 per-tensor: parse quant_scales into t.fp8, and on CUDA require the sm_90a kernels."""
    if not t.is_fp8:
        return
    t.fp8 = _quant.parse_fp8_quant_scales(quant_scales, num_local, t.x.device)
    arch = _device_arch(t.x.device.index) if t.x.is_cuda else "90a"
    if arch != "90a":
        raise _not_implemented(f"FP8 on arch {arch} (its kernels need sm_90a)")


def _check_int8(t: MoeTensors, quant_scales, num_local: int) -> None:
    """INT8 weight-only: parse quant_scales into t.int8."""
    if not t.int8_woq:
        return
    t.int8 = _quant.parse_int8_quant_scales(quant_scales, num_local, t.fc1.shape[1], t.x.shape[1], t.x.dtype,
                                            t.x.device)


def _plan(t: MoeTensors, *, output_dtype, quant_scales, activation_type, tp_size, tp_rank, ep_size, ep_rank,
          cluster_rank) -> MoeConfig:
    """Validate every argument and build the typed config (errors name the FlashInfer argument)."""
    act = _activation(activation_type)
    _check_parallel(tp_size, tp_rank, ep_size, ep_rank, cluster_rank)
    dtype = _check_input(t, output_dtype)
    num_local, inter = _check_weights(t, act.is_gated)
    topk = _check_routing(t, num_local * ep_size)
    _check_biases(t, num_local, t.fc1.shape[1], dtype)
    _check_per_expert(t, num_local)
    _check_output(t, dtype)
    _check_alignment(t)
    _check_fp8(t, quant_scales, num_local)
    _check_int8(t, quant_scales, num_local)
    has_swiglu = any(p is not None for p in (t.swiglu_alpha, t.swiglu_beta, t.swiglu_limit))
    act = ActivationType[_ref.effective_activation(act.name, has_swiglu)]
    return MoeConfig(t.x.shape[0], t.x.shape[1], inter, topk, num_local, act, dtype, ep_size, ep_rank, tp_size,
                     tp_rank)


# -- the pipeline ----------------------------------------------------------------------------------------------------
def _device_arch(index: int) -> str:
    return device_archs(index)[0]  # cached there; JITMOE_ARCH, when set, decides as it does for the specs


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gemm_configs(num_slots: int, num_local: int, hidden: int, inter: int, x: torch.Tensor, activation: str,
                  kernel: str, k_splits: int, workload: Optional[_autotune.Workload] = None,
                  tile_dtype: Optional[torch.dtype] = None, weight: Optional[str] = None):
    """Configs of GEMM1 (n = I, k = H) and GEMM2 (n = H, k = I), same block_m: the tuned choice for the call's
    problem (stored, or measured now inside ``autotune()``; ``workload`` holds the tensors to measure on) unless
    a kernel or split is forced, else the heuristic (for ``tile_dtype``, default x's, and ``weight``, 's8' for
    int8 weights) with split-K chosen per GEMM."""
    device = x.device
    arch, num_sms = _device_arch(device.index), _device_sms(device.index)
    if workload is not None and not (kernel or k_splits):
        tuned = _autotune.choose(workload, arch, num_sms)
        if tuned is not None:
            return tuned
    common = dict(arch=arch, dtype=tile_dtype or x.dtype, kernel=kernel or None, num_sms=num_sms,
                  k_splits=k_splits or None, weight=weight)
    return (_gemm.select_config(num_slots, num_local, inter, hidden, gated=activation in _gemm.GATED_ACTIVATIONS,
                                **common),
            _gemm.select_config(num_slots, num_local, hidden, inter, gated=False, **common))


def _fp8_gemm_configs(num_slots: int, num_local: int, hidden: int, inter: int, x: torch.Tensor, activation: str,
                      kernel: str, k_splits: int):
    """FP8: the heuristic's 16-bit sm90ws tiles in their e4m3 form (no split-K or autotune for FP8)."""
    if kernel not in ("", "sm90ws") or k_splits > 1:
        raise _not_implemented(f"FP8 on a forced kernel {kernel!r} or split-K {k_splits} (FP8 runs on sm90ws and "
                               "the decode path only)")
    cfg1, cfg2 = _gemm_configs(num_slots, num_local, hidden, inter, x, activation, "sm90ws", 1,
                               tile_dtype=torch.bfloat16)
    return _gemm.fp8_config(cfg1), _gemm.fp8_config(cfg2)


def _run_cuda(output, x, topk_ids, slot_weights, fc1, fc2, fc1_bias, fc2_bias, act_params: dict, activation: str,
              local_expert_offset: int, kernel: str, k_splits: int, fp8: Optional[_quant.Fp8Scales] = None,
              int8: Optional[_quant.Int8Scales] = None) -> None:
    """The decode path for a few tokens, else moe_align -> GEMM1 -> GEMM2 -> combine; on the current stream, scratch
    from the caching allocator. ``fp8``: e4m3 x, fc1 and fc2 with these scales (GEMM1 then writes e4m3); ``int8``:
    int8 fc1 and fc2 with these per-channel scales."""
    num_tokens, topk = topk_ids.shape
    num_local, hidden, inter = fc2.shape
    heuristic = not kernel and not k_splits
    if kernel == DECODE or (heuristic and _decode.use_decode(num_tokens, topk, num_local, hidden, inter,
                                                             x.element_size(), fc1.element_size())):
        fp8_scales = (fp8.fc1_dequant, fp8.fc2_quant, fp8.fc2_dequant) if fp8 is not None else None
        _decode.run_decode(output, x, topk_ids, slot_weights, fc1, fc2, fc1_bias, fc2_bias, act_params, activation,
                           local_expert_offset, fp8_scales, (int8.fc1, int8.fc2) if int8 is not None else None)
        return
    if fp8 is not None:
        cfg1, cfg2 = _fp8_gemm_configs(num_tokens * topk, num_local, hidden, inter, x, activation, kernel, k_splits)
    elif int8 is not None:
        if kernel not in ("", *_gemm.S8_KERNELS):
            raise _not_implemented(f"INT8 weight-only on a forced kernel {kernel!r} (int8 weights run on the sm90ws "
                                   "and sm80 kernels and the decode path only)")
        cfg1, cfg2 = _gemm_configs(num_tokens * topk, num_local, hidden, inter, x, activation, kernel, k_splits,
                                   weight="s8")
    else:
        workload = _autotune.Workload(x, topk_ids, slot_weights, fc1, fc2, fc1_bias, fc2_bias, act_params,
                                      activation, local_expert_offset)
        cfg1, cfg2 = _gemm_configs(num_tokens * topk, num_local, hidden, inter, x, activation, kernel, k_splits,
                                   workload)
    routing = _permute.empty_align_outputs(num_tokens * topk, num_local, cfg1.block_m, x.device)
    # moe_align also writes the slots' rows that GEMM1's gather needs, sparing it a launch.
    slot_rows = (torch.empty(num_tokens * topk, dtype=torch.int32, device=x.device)
                 if _gemm.gathers_a(cfg1, num_tokens * topk, num_local) else None)
    # GEMM2 may start on GEMM1's finished blocks while GEMM1's last wave runs: counters that moe_align zeroes.
    overlap = _gemm.overlaps_gemm2(cfg1, cfg2, num_tokens * topk, num_local, inter, _device_sms(x.device.index))
    block_done = torch.empty(routing[1].shape[0], dtype=torch.int32, device=x.device) if overlap else None
    _permute.align_into(topk_ids, num_local, cfg1.block_m, local_expert_offset, routing, slot_rows=slot_rows,
                        block_done=block_done)
    sorted_ids, block_expert, num_padded, _ = routing
    h = torch.empty(sorted_ids.shape[0], inter, dtype=x.dtype, device=x.device)  # FP8: e4m3, GEMM2's input
    scales1 = dict(acc_scale=fp8.fc1_dequant, out_scale=fp8.fc2_quant) if fp8 is not None else {}
    _gemm.launch_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out=h, topk=topk, activation=activation,
                       fc1_bias=fc1_bias, config=cfg1, slot_rows=slot_rows, w_scale=int8.fc1 if int8 else None,
                       block_done=block_done, **scales1, **act_params)
    # top-1: each token has one slot, so GEMM2 can write the output rows itself (zeroed: rows without a local
    # expert are never written); otherwise it writes per-slot rows that the combine sums in a fixed order.
    direct = topk == 1 and output.data_ptr() % 16 == 0
    out_slots = output if direct else torch.empty(num_tokens * topk, hidden, dtype=output.dtype, device=x.device)
    if direct:
        output.zero_()
    _gemm.launch_gemm2(h, fc2, sorted_ids, block_expert, num_padded, slot_weights, out=out_slots, fc2_bias=fc2_bias,
                       config=cfg2, acc_scale=fp8.fc2_dequant if fp8 is not None else None,
                       w_scale=int8.fc2 if int8 else None, block_done=block_done, gemm1_config=cfg1)
    if not direct:
        _permute.combine_into(out_slots, topk_ids, output, num_local, local_expert_offset)


def _check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """CPU only (a device check would need a host sync): every id must name one of the E_l * ep_size experts."""
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        bad = topk_ids[(topk_ids < 0) | (topk_ids >= num_experts)][0].item()
        raise ValueError(f"token_selected_experts: expected ids in [0, {num_experts}), got {bad}")


@custom_op("jitmoe::fused_moe", mutates_args=("output",))
def _fused_moe_op(output: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, slot_weights: torch.Tensor,
                  fc1: torch.Tensor, fc2: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                  fc2_bias: Optional[torch.Tensor], swiglu_alpha: Optional[torch.Tensor],
                  swiglu_beta: Optional[torch.Tensor], swiglu_limit: Optional[torch.Tensor], activation: str,
                  ep_size: int, ep_rank: int, kernel: str, k_splits: int, fc1_dequant: Optional[torch.Tensor] = None,
                  fc2_quant: Optional[torch.Tensor] = None, fc2_dequant: Optional[torch.Tensor] = None,
                  fc1_wscale: Optional[torch.Tensor] = None, fc2_wscale: Optional[torch.Tensor] = None) -> None:
    """output <- fused MoE. fc2_bias arrives already dropped on TP ranks other than 0; slot_weights is [T * k].
    FP8: x, fc1 and fc2 in e4m3 with the three scales of jitmoe.quant.Fp8Scales (None otherwise). INT8 weight-only:
    int8 fc1 and fc2 with the per-channel scales of jitmoe.quant.Int8Scales (None otherwise)."""
    num_local = fc2.shape[0]
    act_params = {name: value for name, value in (("swiglu_alpha", swiglu_alpha), ("swiglu_beta", swiglu_beta),
                                                   ("swiglu_limit", swiglu_limit))
                  if name in _SWIGLU_PARAMS.get(activation, ())}
    fp8 = _quant.Fp8Scales(fc1_dequant, fc2_quant, fc2_dequant) if fc1_dequant is not None else None
    int8 = _quant.Int8Scales(fc1_wscale, fc2_wscale) if fc1_wscale is not None else None
    if x.is_cuda:
        _run_cuda(output, x, topk_ids, slot_weights, fc1, fc2, fc1_bias, fc2_bias, act_params, activation,
                  ep_rank * num_local, kernel, k_splits, fp8, int8)
        return
    _check_ids_in_range(topk_ids, num_local * ep_size)
    output.copy_(_ref.fused_moe_reference(x, topk_ids, slot_weights.view(topk_ids.shape), fc1, fc2,
                                          fc1_expert_biases=fc1_bias, fc2_expert_biases=fc2_bias,
                                          activation=activation, ep_size=ep_size, ep_rank=ep_rank,
                                          out_dtype=output.dtype, fc1_dequant=fc1_dequant, fc2_quant=fc2_quant,
                                          fc2_dequant=fc2_dequant, fc1_weight_scales=fc1_wscale,
                                          fc2_weight_scales=fc2_wscale, **act_params))


@_fused_moe_op.register_fake
def _(output, x, topk_ids, slot_weights, fc1, fc2, fc1_bias, fc2_bias, swiglu_alpha, swiglu_beta, swiglu_limit,
      activation, ep_size, ep_rank, kernel, k_splits, fc1_dequant=None, fc2_quant=None, fc2_dequant=None,
      fc1_wscale=None, fc2_wscale=None) -> None:
    return None


def run_fused_moe(cfg: MoeConfig, t: MoeTensors) -> torch.Tensor:
    """Run a validated call: writes and returns ``t.output``. Empty inputs launch nothing."""
    if cfg.num_tokens == 0:
        return t.output
    slot_weights = (t.scales.reshape(-1) if t.scales is not None
                    else torch.ones(cfg.num_tokens * cfg.topk, dtype=torch.float32, device=t.x.device))
    fc2_bias = t.fc2_bias if cfg.apply_fc2_bias else None
    fp8 = (t.fp8.fc1_dequant, t.fp8.fc2_quant, t.fp8.fc2_dequant) if t.fp8 is not None else (None, None, None)
    int8 = (t.int8.fc1, t.int8.fc2) if t.int8 is not None else (None, None)
    _fused_moe_op(t.output, t.x, t.topk_ids, slot_weights, t.fc1, t.fc2, t.fc1_bias, fc2_bias, t.swiglu_alpha,
                  t.swiglu_beta, t.swiglu_limit, cfg.activation.name, cfg.ep_size, cfg.ep_rank, _forced_kernel,
                  _forced_split_k, *fp8, *int8)
    return t.output


# -- the FlashInfer-compatible adapter -------------------------------------------------------------------------------
def cutlass_fused_moe(input: torch.Tensor, token_selected_experts: torch.Tensor, token_final_scales: torch.Tensor,
                      fc1_expert_weights: torch.Tensor, fc2_expert_weights: torch.Tensor, output_dtype: torch.dtype,
                      quant_scales: list, fc1_expert_biases: Optional[torch.Tensor] = None,
                      fc2_expert_biases: Optional[torch.Tensor] = None, input_sf: Optional[torch.Tensor] = None,
                      swiglu_alpha: Optional[torch.Tensor] = None, swiglu_beta: Optional[torch.Tensor] = None,
                      swiglu_limit: Optional[torch.Tensor] = None, tp_size: int = 1, tp_rank: int = 0,
                      ep_size: int = 1, ep_rank: int = 0, cluster_size: int = 1, cluster_rank: int = 0,
                      output: Optional[torch.Tensor] = None, enable_alltoall: bool = False,
                      use_deepseek_fp8_block_scale: bool = False, use_w4_group_scaling: bool = False,
                      use_mxfp8_act_scaling: bool = False, min_latency_mode: bool = False,
                      use_packed_weights: bool = False, use_wfp4afp8_humming: bool = False,
                      tune_max_num_tokens: int = 8192, enable_pdl: Optional[bool] = None,
                      activation_type: ActivationType = ActivationType.Swiglu, swizzled_input_sf: bool = True,
                      use_fused_finalize: bool = True, profile_ids: Optional[list] = None,
                      workspace_buffer: Optional[torch.Tensor] = None, *, situ_beta: Optional[torch.Tensor] = None,
                      situ_linear_beta: Optional[torch.Tensor] = None, use_int8_woq_per_channel: bool = False) -> list:
    """The fused MoE layer, FlashInfer's ``cutlass_fused_moe`` contract (bf16/fp16, FP8 per-tensor, and INT8
    weight-only per channel).

    input [T, H]; token_selected_experts int32 [T, k] (global ids); token_final_scales float32 [T, k] (None: 1);
    fc1_expert_weights [E_l, 2I, H] with the up half first and the gate half second ([E_l, I, H] for non-gated
    activations); fc2_expert_weights [E_l, H, I]; biases [E_l, fc1 rows] and [E_l, H], both or neither (fc2's only
    on tp_rank 0, added before the routing weight); swiglu_* float32 [E_l] (with Swiglu: SwigluBias). EP: local
    experts are [ep_rank * E_l, (ep_rank + 1) * E_l), rows without one are zero. Returns ``[output]`` (``output``
    itself when given). enable_pdl, tune_max_num_tokens, profile_ids, swizzled_input_sf and workspace_buffer are
    accepted and unused; use_fused_finalize is deterministic either way (jitmoe never reduces with atomics).
    FP8 per-tensor (sm_90a): input and both weights float8_e4m3fn, output_dtype bf16/fp16 (also the biases' dtype),
    H and I multiples of 16, quant_scales = [fc1_dequant [E_l], fc2_quant (scalar or [E_l]), fc2_dequant [E_l],
    fc1_input_dequant (scalar)] as FlashInfer takes them (jitmoe.quant.fp8_quant_scales makes them).
    INT8 weight-only per channel (``use_int8_woq_per_channel=True``, keyword only: TensorRT-LLM's flag, which
    FlashInfer lacks): bf16/fp16 input, int8 weights in the layouts above, H and I multiples of 16, quant_scales =
    [fc1_scales [E_l, fc1 rows], fc2_scales [E_l, H]] in float32 or the input's dtype, one per weight row
    (jitmoe.quant.quantize_int8_per_channel makes them).
    """
    _reject_unsupported(quant_scales=quant_scales, input_sf=input_sf, cluster_size=cluster_size,
                        enable_alltoall=enable_alltoall, ep_size=ep_size, situ_beta=situ_beta,
                        situ_linear_beta=situ_linear_beta,
                        flags=dict(use_deepseek_fp8_block_scale=use_deepseek_fp8_block_scale,
                                   use_w4_group_scaling=use_w4_group_scaling,
                                   use_mxfp8_act_scaling=use_mxfp8_act_scaling, min_latency_mode=min_latency_mode,
                                   use_packed_weights=use_packed_weights, use_wfp4afp8_humming=use_wfp4afp8_humming),
                        tensors={"input": input, "fc1_expert_weights": fc1_expert_weights,
                                 "fc2_expert_weights": fc2_expert_weights},
                        int8_woq=use_int8_woq_per_channel)
    t = MoeTensors(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                   fc1_expert_biases, fc2_expert_biases, swiglu_alpha, swiglu_beta, swiglu_limit, output,
                   int8_woq=use_int8_woq_per_channel)
    cfg = _plan(t, output_dtype=output_dtype, quant_scales=quant_scales, activation_type=activation_type,
                tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank, cluster_rank=cluster_rank)
    _check_workspace(workspace_buffer, input.device)
    if t.output is None:
        t.output = torch.empty(input.shape, dtype=cfg.dtype, device=input.device)
    return [run_fused_moe(cfg, t)]
