"""Grouped GEMMs of the fused-MoE pipeline on the expert-sorted, tile-padded row order built by moe_align.

GEMM1: ``inter[p] = act(x[slot // topk] @ fc1[e]^T + b1[e])``; GEMM2: ``out_slots[slot] = w[slot] * (inter[p] @
fc2[e]^T + b2[e])`` for the real rows p (contract: csrc_templates/moe/moe_gemm_args.cuh). Three kernels implement
it: 'sm80' (mma.sync + cp.async, any GPU from SM80 on), 'sm90' (wgmma + cp.async, sm_90a only) and 'sm90ws'
(persistent, warp-specialised, TMA-fed wgmma, sm_90a only, BLOCK_M 128: the default there).
In this module, in order: tile configs and their heuristic, the spec builder, validation, the CPU reference, the
torch ops, the public functions and the prewarm table.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..jit import KernelSpec, UnsupportedSpecError, device_archs, load_module, normalize_arch
from ..jit.spec import default_template_root
from ..reference import moe as _ref
from ._library import custom_op
from ._validate import DTYPE_TAG, check_choice, check_int, check_tensor

__all__ = ["GemmConfig", "select_config", "gemm_spec", "moe_gemm1", "moe_gemm2", "ACTIVATIONS",
           "GATED_ACTIVATIONS"]

# FlashInfer's ActivationType member names (the kernel's `Act` enumerators carry the same names).
ACTIVATIONS = _ref.ACTIVATION_NAMES
GATED_ACTIVATIONS = _ref.GATED_ACTIVATIONS
KERNELS = ("sm80", "sm90", "sm90ws")
SM90A_KERNELS = frozenset({"sm90", "sm90ws"})   # wgmma / TMA: built for arch 90a only
TMA_A_KERNELS = frozenset({"sm90ws"})           # GEMM1 may read a sorted copy of x (MoeGemmArgs::a_sorted)
SPLIT_K_KERNELS = frozenset({"sm80", "sm90"})   # kernels that implement k_splits > 1
S8_KERNELS = frozenset({"sm80", "sm90ws"})       # kernels that take int8 weights (INT8 weight-only)
# sm90ws: CTAs per cluster that share each weight tile by TMA multicast, by whether B has two halves (gated GEMM1).
# Measured on the H100 (benchmarks/results/h100-2026-11-22-session6/): two CTAs cut the DRAM reads of gated GEMM1
# where neighbouring CTAs drift apart and lose each other's weight tiles in L2 (DeepSeek-V3 T=16384: 85.5 -> 28.6 GB
# read, 30.8 -> 16.8 ms; T=4096 9.8 -> 8.4 ms; Qwen3 T=4096 0.65 -> 0.59 ms) and never lost there; GEMM2 with two
# was slower on 6 of 8 rows (Qwen3/OLMoE T=4096 +4%/+7%), so one-half GEMMs run unclustered. A rule fitted in session
# 15 ("GEMM2 in clusters of two when K >= 2048 and <= 512 rows per expert": DeepSeek-V3 T=4096 -12%) failed on held-out
# shapes (benchmarks/results/h100-2026-11-23-session17/: Mixtral-8x22B T=512 / 2048 +22% / +13%, Qwen2-57B T=2048 +6%).
SM90WS_CLUSTER_M = {True: 2, False: 1}
BLOCK_MS = (16, 32, 64, 128)
MAX_K_SPLITS = 16
GEMM_DTYPES = (torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------------------------------------------
# Tile configs


@dataclass(frozen=True)
class GemmConfig:
    """One tile configuration of one kernel. block_m is also moe_align's block size: GEMM1 and GEMM2 of one call
    must share it (select_config guarantees that for equal num_slots, num_experts, arch and kernel). k_splits is a
    run-time choice (split-K, csrc_templates/moe/split_k.cuh): it does not change the compiled module."""

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    stages: int
    k_splits: int = 1
    cluster_m: int = 1  # sm90ws only: CTAs per cluster multicasting each weight tile

    def __post_init__(self):
        check_choice("config.kernel", self.kernel, KERNELS)
        check_choice("config.block_m", self.block_m, BLOCK_MS)
        for name, value, high in (("block_n", self.block_n, 256), ("block_k", self.block_k, 128)):
            check_int(f"config.{name}", value, low=16, high=high)
            if value % 16:
                raise ValueError(f"config.{name}: expected a multiple of 16, got {value}")
        check_int("config.stages", self.stages, low=2, high=8)
        check_int("config.k_splits", self.k_splits, low=1, high=MAX_K_SPLITS)
        check_choice("config.cluster_m", self.cluster_m, (1, 2) if self.kernel == "sm90ws" else (1,))


# Shared memory a block may use (static + dynamic, opt-in maximum) per SM major.minor; unknown archs get the smallest.
_SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
               120: 101376, 121: 101376}
_SMEM_LIMIT_DEFAULT = 101376

# block_m tiers by expected rows per expert (num_slots / num_experts): (upper bound, block_m); the last is open.
_SM80_TIERS = ((24.0, 16), (96.0, 64), (float("inf"), 128))
_SM90_TIERS = ((96.0, 64), (float("inf"), 128))
_TIERS = {"sm80": _SM80_TIERS, "sm90": _SM90_TIERS, "sm90ws": ((float("inf"), 128),)}
# (kernel, block_m) -> (block_n, block_k, stages before fitting the arch's shared memory). sm90ws stage counts are
# measured, not maximal (H100, benchmarks/results/h100-2026-11-24-session22/): gated GEMM1 at 3 stages instead of 4
# was 6-14% slower on six of seven rows (DeepSeek-V3 T = 4096 5% faster); the wide GEMM2 tile below fits 3, and a
# fourth (its epilogue staged in two passes to make room) was 5-30% slower where weights dominate, in sessions 15
# and 22 alike.
_TILES = {("sm80", 16): (64, 64, 4), ("sm80", 64): (128, 32, 4), ("sm80", 128): (128, 32, 4),
          ("sm90", 64): (128, 64, 4), ("sm90", 128): (128, 64, 4), ("sm90ws", 128): (128, 64, 4)}
# int8 weights (sm80 kernel) at block_m 64 and 128: BLOCK_K 64 with 3 stages, where the 16-bit tile has 32 with 4:
# each k slice costs the int8 mainloop a conversion pass of the B tile besides its barrier, so fewer, longer slices.
_S8_TILES = {("sm80", 64): (128, 64, 3), ("sm80", 128): (128, 64, 3)}
# Wider block_n for GEMMs with one B half (GEMM2, non-gated GEMM1): a gated tile already reads 2 x block_n rows of
# B per stage; with one half, 256 columns keep the shared-memory traffic per MMA the same (sm90ws only: its
# accumulators allow 64 x 256 per warpgroup).
_WIDE_BLOCK_N = {("sm90ws", 128): 256}
# ... except with few rows per expert, where every tile only streams weights: there 128 columns and 6 stages give the
# persistent grid twice the tiles to balance. H100, GEMM2 kernel time, mean of three rounds
# (benchmarks/results/h100-2026-11-23-session13/dev_gemm2_block_n.log): Qwen3 T = 16 (1 row per expert) 99.7 -> 91.0
# µs, OLMoE T = 16 85.8 -> 83.3, Mixtral-8x7B T = 16 / 64 (4 / 16 rows) 318.1 -> 312.4 / 319.4 -> 313.5, Qwen3
# T = 256 (16 rows) 165.8 -> 163.5; DeepSeek-V3 T = 16 / 64 and Qwen3 / OLMoE T = 64 even. Measured on GEMM2;
# non-gated GEMM1 tiles follow the same rule.
_NARROW_MAX_ROWS_PER_EXPERT = 16
_NARROW_TILES = {("sm90ws", 128): (128, 64, 6)}
# sm90ws GEMM1 with at most this many rows per expert (num_slots / E) loads each real A row from x by its own TMA box
# ("direct rows", csrc_templates/moe/sm90ws) instead of first gathering x into a sorted copy: one launch less.
DIRECT_A_MAX_ROWS_PER_EXPERT = 16


def arch_number(arch: str) -> int:
    """'90a' -> 90, '120a' -> 120."""
    a = normalize_arch(arch)
    m = re.match(r"\d+", a)
    if a == "cpu" or not m:
        raise ValueError(f"arch: expected a CUDA arch such as '80' or '90a', got {arch!r}")
    return int(m.group(0))


def smem_limit(arch: str) -> int:
    return _SMEM_LIMIT.get(arch_number(arch), _SMEM_LIMIT_DEFAULT)


def sm80_warps(block_m: int, block_n: int, gated: bool) -> tuple[int, int]:
    """(warps along M, warps along N) of the SM80 kernel: mirrors TileConfig in moe_gemm_sm80.cuh."""
    rows_b = block_n * (2 if gated else 1)
    warps = min(max(block_m * rows_b // (32 * 64), 4), 8)
    warps_m = 2 if block_m >= 64 else 1
    return warps_m, warps // warps_m


def sm80_smem_bytes(cfg: GemmConfig, gated: bool, s8: bool = False) -> int:
    """Static + dynamic shared memory of the SM80 kernel for this tile (mirrors TileConfig::kSmemBytes); ``s8``:
    int8 weights (an int8 B ring plus two 16-bit B tiles)."""
    rows_b = cfg.block_n * (2 if gated else 1)
    tile_a, tile_b16 = 2 * cfg.block_m * (cfg.block_k + 8), 2 * rows_b * (cfg.block_k + 8)
    if s8:
        ring = cfg.stages * (tile_a + rows_b * (cfg.block_k + 16)) + 2 * tile_b16
    else:
        ring = cfg.stages * (tile_a + tile_b16)
    epilogue = 2 * cfg.block_m * (cfg.block_n + 8)
    return max(ring, epilogue) + 4 * cfg.block_m


def sm80_tile_problem(cfg: GemmConfig, gated: bool, arch: str, s8: bool = False) -> str | None:
    """Why the SM80 kernel cannot run this tile on ``arch`` (its static_asserts plus shared memory), or None;
    ``s8``: with int8 weights."""
    if s8 and cfg.stages < 3:
        return f"int8 weights need at least 3 stages, got {cfg.stages}"
    warps_m, warps_n = sm80_warps(cfg.block_m, cfg.block_n, gated)
    warp_m, warp_n = cfg.block_m // warps_m, cfg.block_n // warps_n
    if warp_m % 16 or warp_n % 16 or cfg.block_n % warps_n:
        return (f"block_n={cfg.block_n} gives {warps_n} warps of {cfg.block_n / warps_n:g} columns "
                "(need multiples of 16)")
    accumulators = (2 if gated else 1) * (warp_m // 16) * (warp_n // 8) * 4
    if accumulators > 128:
        return f"{accumulators} fp32 accumulators per thread (at most 128): shrink block_m or block_n"
    need, limit = sm80_smem_bytes(cfg, gated, s8), smem_limit(arch)
    if need > limit:
        return f"needs {need} bytes of shared memory, sm_{arch} has {limit}: lower stages or block_k"
    return None


def sm90ws_smem_bytes(cfg: GemmConfig, gated: bool, s8: bool = False) -> int:
    """Dynamic shared memory of the sm90ws kernel (mirrors its Config::kSmemBytes): the TMA ring, the [BM, BN]
    epilogue staging tile, the 1 KiB swizzle alignment and two mbarriers per stage; ``s8`` (int8 weights): the
    ring's B stages hold 1-byte elements, plus two 16-bit B slots the consumers convert them into."""
    rows_b = cfg.block_n * (2 if gated else 1)
    ring = cfg.stages * (cfg.block_m * 2 + rows_b * (1 if s8 else 2)) * cfg.block_k
    slots = 2 * rows_b * cfg.block_k * 2 if s8 else 0
    return 1024 + ring + slots + cfg.block_m * cfg.block_n * 2 + 16 * cfg.stages


def smem_bytes(cfg: GemmConfig, gated: bool, s8: bool = False) -> int:
    """Shared memory a config needs on its kernel (the sm90 kernel's plan is bounded by the sm80 formula; ``s8``:
    int8 weights, on the sm80 and sm90ws kernels)."""
    return sm90ws_smem_bytes(cfg, gated, s8) if cfg.kernel == "sm90ws" else sm80_smem_bytes(cfg, gated, s8)


def _fit_stages(kernel: str, block_m: int, arch: str, gated: bool = True, narrow: bool = False,
                s8: bool = False) -> GemmConfig:
    """The tier's tile (for one B half: wide where the kernel has one, or its narrow tile when ``narrow``) with the
    most stages, up to the table's, that fits the arch (``s8``: with int8 weights, which need 3 on sm80). Gated (the
    larger case) is the default, so a gated config also fits every one-half GEMM."""
    block_n, block_k, stages = (_S8_TILES if s8 and (kernel, block_m) in _S8_TILES else _TILES)[(kernel, block_m)]
    if not gated and narrow and (kernel, block_m) in _NARROW_TILES:
        block_n, block_k, stages = _NARROW_TILES[(kernel, block_m)]
    elif not gated:
        block_n = _WIDE_BLOCK_N.get((kernel, block_m), block_n)
    # int8 weights on sm90ws: one CTA per cluster (the kernel does not multicast its int8 ring).
    cluster_m = SM90WS_CLUSTER_M[gated and not s8] if kernel == "sm90ws" else 1
    top_stages = stages
    s8_sm80 = s8 and kernel == "sm80"  # int8 on sm80: at least 3 stages, smaller tiles before fewer
    while True:
        cfg = GemmConfig(kernel, block_m, block_n, block_k, stages, cluster_m=cluster_m)
        if smem_bytes(cfg, gated, s8) <= smem_limit(arch):
            return cfg
        if stages > (3 if s8_sm80 else 2):
            stages -= 1
        elif s8_sm80 and block_n > 64:
            # int8's 3 stages and two 16-bit B tiles exceed small SMs (sm_86): a smaller tile
            block_n, stages = block_n // 2, top_stages
        elif s8_sm80 and block_k > 32:
            block_k, stages = block_k // 2, top_stages
        else:
            return cfg


@functools.lru_cache(maxsize=None)
def available_kernels() -> tuple[str, ...]:
    """Kernels whose template ships in csrc_templates/moe (the SM90 one may not exist yet)."""
    root = default_template_root() / "moe"
    return tuple(k for k in KERNELS if (root / k / "gemm.cu").is_file())


def kernels_for_arch(arch: str, kernels=None) -> tuple[str, ...]:
    """Kernels that can run on ``arch``, preferred first."""
    kernels = available_kernels() if kernels is None else tuple(kernels)
    if arch_number(arch) < 80:
        return ()
    on_arch = [k for k in ("sm90ws", "sm90") if k in kernels] if normalize_arch(arch) == "90a" else []
    return tuple(on_arch + (["sm80"] if "sm80" in kernels else []))


def _block_m(kernel: str, rows_per_expert: float) -> int:
    return next(bm for bound, bm in _TIERS[kernel] if rows_per_expert <= bound)


# On sm_90a the persistent kernel (sm90ws) runs every grouped GEMM unless a split is forced (it does not split K);
# the sm90 kernel keeps forced splits. Measured on the H100 (benchmarks/results/h100-2026-11-23-session13/), kernel
# time of the layer against sm90 with its split-K heuristic: DeepSeek-V3 T = 16, 64, 256, 1024 (0.5 to 32 rows per
# expert) -2% to -13%, OLMoE T = 256 and Qwen3 T = 512 (32 rows) -10%, held-out shapes (DeepSeek-V2, Qwen2-57B,
# Qwen3-235B, Mixtral-8x22B at 4-48 rows) -6% to -20% except Mixtral-8x22B at 4 rows per expert (+5%). The
# earlier rule (sm90 from 17 to 63 rows per expert, and at <= 16 when H > 4096: session 7) predates the row groups
# of session 11, which stopped sm90ws from loading the padding rows of an expert's last block.


# int8 weights on sm_90a: sm90ws converts every int8 B tile in shared memory for a 128-row tile, however few of its
# rows are real; with few rows per expert and small experts the sm80 kernel (16-row tiles, split-K) streams the
# weights faster. Measured on the H100 (benchmarks/results/h100-2026-11-24-session26/), layer time sm90ws vs sm80:
# Qwen3-30B (H * I = 1.5 Mi) at 1 / 4 / 16 rows per expert 0.254 / 0.379 / 0.412 vs 0.220 / 0.319 / 0.423 ms, OLMoE
# (2 Mi) at 2 / 8 / 32 rows 0.228 / 0.249 / 0.272 vs 0.210 / 0.226 / 0.306; larger experts gain from sm90ws at
# every row count (Mixtral-8x7B, 56 Mi, at 2 / 4 rows: 0.555 / 0.614 vs 0.595 / 0.755; DeepSeek-V3, 14 Mi, at 0.5 / 2
# rows: 1.88 / 4.70 vs 2.16 / 5.20).
_S8_SM80_MAX_ROWS_PER_EXPERT = 8
_S8_SM80_MAX_EXPERT_ELEMS = 1 << 22


def _auto_kernel(candidates: tuple[str, ...], k_splits: int | None, s8: bool = False, rows_per_expert: float = 0.0,
                 expert_elems: int = 0) -> str:
    """The preferred kernel: the persistent TMA one (sm90ws) without a forced split, else the first kernel that
    runs every tier and split-K. ``s8``: int8 weights (no sm90 among the candidates), which take sm80 with few rows
    per expert of few elements (``expert_elems`` = n * k)."""
    small_s8 = (s8 and rows_per_expert <= _S8_SM80_MAX_ROWS_PER_EXPERT
                and expert_elems <= _S8_SM80_MAX_EXPERT_ELEMS)
    if "sm90ws" in candidates and ("sm90" in candidates or (s8 and not small_s8)) and (k_splits or 1) == 1:
        return "sm90ws"
    return next(k for k in candidates if k in SPLIT_K_KERNELS)


# Split-K: at most this many K slices, each of at least this many BLOCK_K tiles.
_SPLIT_K_MAX = 8
_SPLIT_K_MIN_TILES = 4


def expected_tiles(num_slots: int, num_experts: int, n: int, block_m: int, block_n: int) -> int:
    """Output tiles a GEMM is expected to have: tokens spread evenly over min(num_slots, E) experts (at least one
    M block, so an empty batch never asks for a split)."""
    used = max(1, min(num_slots, num_experts))
    rows = max(1, -(-num_slots // used))
    return used * -(-rows // block_m) * -(-n // block_n)


def split_k_for(tiles: int, k: int, block_k: int, num_sms: int) -> int:
    """K slices for a GEMM of ``tiles`` output tiles: the largest power of two that keeps tiles x slices within
    one wave of ``num_sms`` CTAs and every slice at least _SPLIT_K_MIN_TILES k tiles long (1 = no split)."""
    k_tiles = -(-k // block_k)
    splits = 1
    while (splits * 2 <= _SPLIT_K_MAX and tiles * splits * 2 <= num_sms
           and k_tiles >= splits * 2 * _SPLIT_K_MIN_TILES):
        splits *= 2
    return splits


def select_config(num_slots: int, num_experts: int, n: int, k: int, arch: str, dtype, *,
                  kernel: str | None = None, kernels=None, num_sms: int | None = None,
                  k_splits: int | None = None, gated: bool = True, weight: str | None = None) -> GemmConfig:
    """Tile config for one grouped GEMM of ``num_slots`` (token, choice) rows over ``num_experts`` local experts,
    ``n`` output columns and reduction length ``k``.

    block_m grows with the expected rows per expert (decode: 16, prefill: 128) and depends only on (num_slots,
    num_experts, arch, kernel), so GEMM1 and GEMM2 of one call get the same one. ``kernel`` forces one of KERNELS;
    by default, on arch 90a, 'sm90ws', or 'sm90' when ``k_splits`` > 1 is forced (``_auto_kernel``; ``kernels``
    overrides the list of available templates), elsewhere 'sm80'.
    Split-K (``split_k_for``) is chosen when ``num_sms`` is given and the GEMM has less than a wave of tiles;
    ``k_splits`` forces a value. ``gated`` says whether B has two halves (GEMM1 with a gated activation); GEMMs
    with one half may get a wider block_n (or, with few rows per expert, a narrower one with more stages).
    ``weight`` 's8' (int8 weights, INT8 weight-only) runs on sm90ws (arch 90a) or sm80, the kernels that take them.
    """
    if kernels is not None:
        kernels = tuple(kernels)
    return _select_config(num_slots, num_experts, n, k, arch, dtype, kernel, kernels, num_sms, k_splits, gated,
                          weight)


# Memoised: a layer asks for the same few configs on every call, and the choice (with its validation) is pure and
# costs tens of microseconds of host time per call on the H100 machine. Errors are raised, never cached.
@functools.lru_cache(maxsize=4096, typed=True)
def _select_config(num_slots, num_experts, n, k, arch, dtype, kernel, kernels, num_sms, k_splits,
                   gated, weight) -> GemmConfig:
    check_int("num_slots", num_slots, low=0)
    check_int("num_experts", num_experts, low=1)
    check_int("n", n, low=1)
    check_int("k", k, low=1)
    tag = DTYPE_TAG.get(dtype, dtype)
    check_choice("dtype", tag, ("bf16", "fp16"))
    candidates = kernels_for_arch(arch, kernels)
    if not candidates:
        raise ValueError(f"arch: the MoE GEMM kernels need SM80 or newer with kernels {kernels or available_kernels()},"
                         f" got {arch!r}")
    if num_sms is not None:
        check_int("num_sms", num_sms, low=1)
    if k_splits is not None:
        check_int("k_splits", k_splits, low=1, high=MAX_K_SPLITS)
    rows_per_expert = num_slots / num_experts
    if weight is not None:
        check_choice("weight", weight, ("s8",))
        candidates = tuple(c for c in candidates if c in S8_KERNELS)
    if kernel is None:
        kernel = _auto_kernel(candidates, k_splits, weight is not None, rows_per_expert, n * k)
    elif kernel not in candidates:
        raise ValueError(f"kernel: expected one of {candidates} on arch {arch!r}"
                         f"{' with int8 weights' if weight else ''}, got {kernel!r}")
    if kernel not in SPLIT_K_KERNELS:
        if (k_splits or 1) != 1:
            raise ValueError(f"k_splits: the {kernel} kernel does not split K, got {k_splits}")
        k_splits = 1
    cfg = heuristic_tile(kernel, _block_m(kernel, rows_per_expert), arch, gated, rows_per_expert, s8=weight == "s8")
    if k_splits is None:
        tiles = expected_tiles(num_slots, num_experts, n, cfg.block_m, cfg.block_n)
        k_splits = split_k_for(tiles, k, cfg.block_k, num_sms) if num_sms else 1
    return dataclasses.replace(cfg, k_splits=k_splits)


def heuristic_tile(kernel: str, block_m: int, arch: str, gated: bool, rows_per_expert: float,
                   s8: bool = False) -> GemmConfig:
    """The tile select_config gives ``kernel`` with ``block_m`` at ``rows_per_expert`` (k_splits 1; ``s8``: int8
    weights)."""
    return _fit_stages(kernel, block_m, normalize_arch(arch), gated,
                       narrow=rows_per_expert <= _NARROW_MAX_ROWS_PER_EXPERT, s8=s8)


@functools.lru_cache(maxsize=256)  # twice per FP8 call: dataclasses.replace costs several microseconds
def fp8_config(cfg: GemmConfig) -> GemmConfig:
    """The FP8 form of an sm90ws config: a stage holds BLOCK_K = 128 e4m3 values, the same 128 bytes per row as 64
    bf16 ones, so the ring, its stage count and the shared memory stay those of the 16-bit tile."""
    if cfg.kernel != "sm90ws" or cfg.k_splits != 1:
        raise ValueError(f"config: FP8 runs on the sm90ws kernel without split-K, got {cfg}")
    return dataclasses.replace(cfg, block_k=128)


def default_configs(kernel: str, arch: str, gated: bool = True, s8: bool = False) -> list[GemmConfig]:
    """Every config select_config can return for ``kernel`` on ``arch`` with one or two (``gated``) B halves
    (``s8``: int8 weights; what prewarm builds)."""
    arch = normalize_arch(arch)
    configs = [_fit_stages(kernel, bm, arch, gated, s8=s8) for _, bm in _TIERS[kernel]]
    if not gated:
        configs += [_fit_stages(kernel, bm, arch, gated, narrow=True, s8=s8) for _, bm in _TIERS[kernel]
                    if (kernel, bm) in _NARROW_TILES]
    return configs


# --------------------------------------------------------------------------------------------------------------
# Spec builder


def activation_name(activation) -> str:
    """An ActivationType member (any enum with FlashInfer's names) or its name -> the name."""
    name = getattr(activation, "name", activation)
    check_choice("activation", name, ACTIVATIONS)
    return name


@functools.lru_cache(maxsize=512)
def gemm_spec(cfg: GemmConfig, dtype: str, mode: str, activation: str, archs: tuple[str, ...],
              operand: Optional[str] = None, weight: Optional[str] = None) -> KernelSpec:
    """The spec of one GEMM: ``mode`` 'gemm1' (with ``activation``) or 'gemm2' (activation must be 'Identity').
    ``dtype`` is the layer's type (bias, GEMM2's output); ``operand`` 'e4m3' makes A and B FP8 (sm90ws with
    ``fp8_config``), None keeps them ``dtype``; ``weight`` 's8' makes B int8 with per-channel scales (INT8
    weight-only: sm80, or sm90ws with block_k 64 and clusters of one)."""
    check_choice("dtype", dtype, ("bf16", "fp16"))
    if weight is not None:
        check_choice("weight", weight, ("s8",))
        if (cfg.kernel not in S8_KERNELS or operand is not None
                or (cfg.kernel == "sm90ws" and (cfg.block_k != 64 or cfg.cluster_m != 1))):
            raise UnsupportedSpecError("moe_gemm: int8 weights run on the sm80 kernel, or sm90ws with block_k 64 "
                                       f"and cluster_m 1, with 16-bit A, got {cfg}")
    if operand is not None:
        check_choice("operand", operand, ("e4m3",))
        if cfg.kernel != "sm90ws" or cfg.block_k != 128:
            raise UnsupportedSpecError(f"moe_gemm: e4m3 operands need the sm90ws kernel with block_k 128, got {cfg}")
    check_choice("mode", mode, ("gemm1", "gemm2"))
    activation = activation_name(activation)
    if mode == "gemm2" and activation != "Identity":
        raise UnsupportedSpecError(f"moe_gemm: GEMM2 is built with activation 'Identity', got {activation!r}")
    archs = tuple(normalize_arch(a) for a in archs)
    gated = mode == "gemm1" and activation in GATED_ACTIVATIONS
    if cfg.kernel in SM90A_KERNELS and any(a != "90a" for a in archs):
        raise UnsupportedSpecError(f"moe_gemm: the {cfg.kernel} kernel needs arch 90a only, got archs {archs}")
    if cfg.kernel == "sm80":
        for arch in archs:
            if arch_number(arch) < 80:
                raise UnsupportedSpecError(f"moe_gemm: the sm80 kernel needs SM80 or newer, got arch {arch!r}")
            problem = sm80_tile_problem(cfg, gated, arch, s8=weight == "s8")
            if problem:
                raise UnsupportedSpecError(f"moe_gemm: tile {cfg} unsupported: {problem}")
    params = {"kernel": cfg.kernel, "dtype": dtype, "act": activation, "mode": mode, "block_m": cfg.block_m,
              "block_n": cfg.block_n, "block_k": cfg.block_k, "stages": cfg.stages}
    if cfg.kernel == "sm90ws":
        params = {"kernel": cfg.kernel, "dtype": dtype, "operand": operand or dtype,
                  "weight": weight or operand or dtype, **params, "cluster_m": cfg.cluster_m}
    elif cfg.kernel == "sm80":
        params["weight"] = weight or dtype
    # The SM80 kernel is plain PTX; only the SM90 ones need the CUTLASS/CuTe headers.
    return KernelSpec.create("moe_gemm", "moe", (f"{cfg.kernel}/gemm.cu", "moe_gemm_binding.cpp"), params, archs,
                             cutlass=cfg.kernel in SM90A_KERNELS)


# --------------------------------------------------------------------------------------------------------------
# Validation (the pipeline validates user input; this checks internal consistency cheaply, without a host sync)


def _check_routing(sorted_ids, block_expert, num_padded, device, config) -> int:
    """The moe_align outputs; returns m_pad_max."""
    if not isinstance(config, GemmConfig):
        raise TypeError(f"config: expected a GemmConfig, got {type(config).__name__}")
    check_tensor("sorted_ids", sorted_ids, ndim=1, dtypes=(torch.int32,), device=device)
    m_pad_max = sorted_ids.shape[0]
    if m_pad_max % config.block_m:
        raise ValueError(f"sorted_ids: expected a length that is a multiple of block_m={config.block_m}, "
                         f"got {m_pad_max}")
    check_tensor("block_expert", block_expert, ndim=1, dtypes=(torch.int32,), device=device)
    if block_expert.shape[0] != m_pad_max // config.block_m:
        raise ValueError(f"block_expert: expected {m_pad_max // config.block_m} entries (len(sorted_ids) / "
                         f"block_m), got {block_expert.shape[0]}")
    check_tensor("num_padded", num_padded, dtypes=(torch.int32,), device=device)
    if num_padded.numel() != 1:
        raise ValueError(f"num_padded: expected 1 element, got shape {tuple(num_padded.shape)}")
    return m_pad_max


def _check_weights(name, w, a, bias_name, bias, n_b) -> None:
    """w: [E, n_b, K] in a's dtype; bias: [E, n_b] or None."""
    check_tensor(name, w, ndim=3, dtypes=(a.dtype,), device=a.device)
    if w.shape[1:] != (n_b, a.shape[1]):
        raise ValueError(f"{name}: expected shape [E, {n_b}, {a.shape[1]}], got {tuple(w.shape)}")
    if bias is not None:
        check_tensor(bias_name, bias, ndim=2, dtypes=(a.dtype,), device=a.device)
        if tuple(bias.shape) != (w.shape[0], n_b):
            raise ValueError(f"{bias_name}: expected shape [{w.shape[0]}, {n_b}], got {tuple(bias.shape)}")


def _check_out(out, rows, n, a) -> None:
    check_tensor("out", out, ndim=2, dtypes=(a.dtype,), device=a.device)
    if tuple(out.shape) != (rows, n):
        raise ValueError(f"out: expected shape [{rows}, {n}], got {tuple(out.shape)}")


def _check_multiple_of_8(name, value) -> None:
    if value % 8:
        raise ValueError(f"{name}: expected a multiple of 8, got {value}")


def _check_per_expert(name, t, num_experts, device) -> None:
    if t is not None:
        check_tensor(name, t, ndim=1, dtypes=(torch.float32,), device=device)
        if t.shape[0] != num_experts:
            raise ValueError(f"{name}: expected {num_experts} values (one per local expert), got {t.shape[0]}")


def _ctas(m_pad_max: int, n: int, config: GemmConfig) -> int:
    """CTAs of one launch: M blocks x N blocks."""
    return m_pad_max // config.block_m * -(-n // config.block_n)


def _check_int32_range(**sizes) -> None:
    for name, value in sizes.items():
        if value >= 2**31:
            raise ValueError(f"{name}: expected < 2**31 (the kernels index with int32), got {value}")


def _check_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out, topk, activation, fc1_bias, params, config):
    check_tensor("x", x, ndim=2, dtypes=GEMM_DTYPES)
    check_int("topk", topk, low=1)
    m_pad_max = _check_routing(sorted_ids, block_expert, num_padded, x.device, config)
    check_tensor("fc1", fc1, ndim=3, dtypes=(x.dtype,), device=x.device)
    gated = activation in GATED_ACTIVATIONS
    if gated and fc1.shape[1] % 2:
        raise ValueError(f"fc1: a gated activation needs [E, 2N, K] (up rows, then gate rows), got {tuple(fc1.shape)}")
    n = fc1.shape[1] // 2 if gated else fc1.shape[1]
    _check_weights("fc1", fc1, x, "fc1_bias", fc1_bias, fc1.shape[1])
    _check_out(out, m_pad_max, n, x)
    _check_multiple_of_8("K (x.shape[1])", x.shape[1])
    _check_multiple_of_8("N (out.shape[1])", n)
    for name, t in params.items():
        _check_per_expert(name, t, fc1.shape[0], x.device)
    _check_int32_range(num_slots=x.shape[0] * topk, m_pad_max=m_pad_max, ctas=_ctas(m_pad_max, n, config))
    return n


def _check_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out, fc2_bias, config):
    check_tensor("inter", inter, ndim=2, dtypes=GEMM_DTYPES)
    m_pad_max = _check_routing(sorted_ids, block_expert, num_padded, inter.device, config)
    if inter.shape[0] != m_pad_max:
        raise ValueError(f"inter: expected {m_pad_max} rows (len(sorted_ids)), got {inter.shape[0]}")
    check_tensor("fc2", fc2, ndim=3, dtypes=(inter.dtype,), device=inter.device)
    n = fc2.shape[1]
    _check_weights("fc2", fc2, inter, "fc2_bias", fc2_bias, n)
    check_tensor("out", out, ndim=2, dtypes=(inter.dtype,), device=inter.device)
    num_slots = out.shape[0]
    _check_out(out, num_slots, n, inter)
    if slot_weights is not None:
        check_tensor("slot_weights", slot_weights, dtypes=(torch.float32,), device=inter.device)
        if slot_weights.numel() != num_slots:
            raise ValueError(f"slot_weights: expected {num_slots} values (one per slot), got {slot_weights.numel()}")
    _check_multiple_of_8("K (inter.shape[1])", inter.shape[1])
    _check_multiple_of_8("N (out.shape[1])", n)
    _check_int32_range(num_slots=num_slots, m_pad_max=m_pad_max, ctas=_ctas(m_pad_max, n, config))
    return num_slots, n


def _check_aligned(**tensors) -> None:
    """16-byte vector loads and stores need 16-byte aligned bases (rows are multiples of 8 elements)."""
    for name, t in tensors.items():
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned data pointer, got address {t.data_ptr():#x}")


# --------------------------------------------------------------------------------------------------------------
# CPU reference (also the GPU tests' oracle): fp32 math, results rounded to the output dtype.


def _real_rows(sorted_ids, block_expert, num_padded, num_slots, num_experts, block_m):
    """(row positions p, their slots, their experts) of the real rows among the first num_padded."""
    used = min(int(num_padded.reshape(-1)[0]), sorted_ids.shape[0])
    p = torch.arange(max(used, 0), device=sorted_ids.device)
    slots = sorted_ids[p].long()
    experts = block_expert[p // block_m].long()
    real = (slots >= 0) & (slots < num_slots) & (experts >= 0) & (experts < num_experts)
    return p[real], slots[real], experts[real]


def gemm1_reference(x, fc1, sorted_ids, block_expert, num_padded, out, topk, activation, fc1_bias, alpha, beta,
                    limit, block_m, acc_scale=None, out_scale=None, w_scale=None) -> None:
    """Writes the real rows of ``out`` (inter); padding rows are left as they are. FP8 (``acc_scale`` [E],
    ``out_scale`` [1] or [E]): the product is scaled by acc_scale[e], act(...) * out_scale rounded to e4m3. INT8
    weight-only: int8 fc1 with per-row scales ``w_scale`` [E, n_b]."""
    rows, slots, experts = _real_rows(sorted_ids, block_expert, num_padded, x.shape[0] * topk, fc1.shape[0], block_m)
    for e in experts.unique().tolist():
        sel = experts == e
        h = x[slots[sel] // topk].float() @ _ref.dequantized(fc1, e, w_scale).t()
        if acc_scale is not None:
            h = h * acc_scale[e].float()
        if fc1_bias is not None:
            h = h + fc1_bias[e].float()
        y = _ref.apply_activation(activation, h, expert=e, swiglu_alpha=alpha, swiglu_beta=beta, swiglu_limit=limit)
        if out_scale is not None:
            y = _ref.round_to_fp8(y * out_scale[e % out_scale.numel()].float())
        out[rows[sel]] = y.to(out.dtype)


def gemm2_reference(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out, fc2_bias, block_m,
                    acc_scale=None, w_scale=None) -> None:
    """Writes out[slot] for the real rows; other rows of ``out`` are left as they are (FP8: ``acc_scale`` [E]
    scales the product before the bias; INT8 weight-only: int8 fc2 with per-row scales ``w_scale`` [E, N])."""
    rows, slots, experts = _real_rows(sorted_ids, block_expert, num_padded, out.shape[0], fc2.shape[0], block_m)
    for e in experts.unique().tolist():
        sel = experts == e
        y = inter[rows[sel]].float() @ _ref.dequantized(fc2, e, w_scale).t()
        if acc_scale is not None:
            y = y * acc_scale[e].float()
        if fc2_bias is not None:
            y = y + fc2_bias[e].float()
        if slot_weights is not None:
            y = y * slot_weights.reshape(-1)[slots[sel]].float()[:, None]
        out[slots[sel]] = y.to(out.dtype)


# --------------------------------------------------------------------------------------------------------------
# torch ops: CUDA tensors run the kernel, CPU tensors the reference. The config travels as plain fields.

# The ops rebuild their (frozen, validated) config from those fields on every call: memoised, like select_config.
_config_of = functools.lru_cache(maxsize=256, typed=True)(GemmConfig)


def _scratch(cfg: GemmConfig, rows: int, width: int, a: torch.Tensor, a_rows: int, num_slots: int,
             num_experts: int, gemm1: bool, slot_rows: Optional[torch.Tensor] = None):
    """(partials, a_sorted, slot_rows) the launch needs: split-K slices [k_splits, rows, width] fp32; for a GEMM1
    that gathers A (``gathers_a``), the sorted copy of A ([a_rows, K]) and the sorted row of every slot
    ([num_slots] int32, the gather's inverse map: the caller's, filled by moe_align, else scratch). None where not
    needed. From the caching allocator, so CUDA graphs capture them."""
    partials = (torch.empty(cfg.k_splits, rows, width, dtype=torch.float32, device=a.device)
                if cfg.k_splits > 1 else None)
    if not (gemm1 and gathers_a(cfg, num_slots, num_experts)):
        return partials, None, None
    a_sorted = torch.empty(a_rows, a.shape[1], dtype=a.dtype, device=a.device)
    if slot_rows is None:
        slot_rows = torch.empty(num_slots, dtype=torch.int32, device=a.device)
    return partials, a_sorted, slot_rows


@custom_op("jitmoe::moe_gemm1", mutates_args=("out", "block_done"))
def _moe_gemm1_op(x: torch.Tensor, fc1: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                  num_padded: torch.Tensor, out: torch.Tensor, topk: int, activation: str,
                  fc1_bias: Optional[torch.Tensor], swiglu_alpha: Optional[torch.Tensor],
                  swiglu_beta: Optional[torch.Tensor], swiglu_limit: Optional[torch.Tensor],
                  slot_rows: Optional[torch.Tensor], kernel: str, block_m: int, block_n: int, block_k: int,
                  stages: int, k_splits: int, cluster_m: int, acc_scale: Optional[torch.Tensor] = None,
                  out_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                  block_done: Optional[torch.Tensor] = None) -> None:
    # slot_rows: every slot's sorted row as moe_align writes it (permute.align_into(..., slot_rows=)), which spares
    # the sm90ws launch its inversion of sorted_ids; None: the launch inverts it itself.
    # acc_scale / out_scale: FP8 only (x, fc1 and out in e4m3); w_scale: INT8 weight-only (int8 fc1). See
    # gemm1_reference. block_done: see launch_gemm1 (sm90ws only; the CPU reference has nothing to count).
    if not x.is_cuda:
        gemm1_reference(x, fc1, sorted_ids, block_expert, num_padded, out, topk, activation, fc1_bias,
                        swiglu_alpha, swiglu_beta, swiglu_limit, block_m, acc_scale, out_scale, w_scale)
        return
    _check_aligned(x=x, fc1=fc1, out=out)
    cfg = _config_of(kernel, block_m, block_n, block_k, stages, k_splits, cluster_m)
    dtype, operand = _spec_types(x, fc1_bias)
    spec = gemm_spec(cfg, dtype, "gemm1", activation, device_archs(x.device), operand, _weight_tag(fc1))
    num_slots = x.shape[0] * topk
    filled = slot_rows is not None
    partials, a_sorted, slot_rows = _scratch(cfg, out.shape[0], fc1.shape[1], x, sorted_ids.shape[0], num_slots,
                                             fc1.shape[0], gemm1=True, slot_rows=slot_rows)
    load_module(spec).run(x, fc1, fc1_bias, out, sorted_ids, block_expert, num_padded, None, swiglu_alpha,
                          swiglu_beta, swiglu_limit, num_slots, topk, out.shape[1], x.shape[1], partials,
                          a_sorted, slot_rows, filled, k_splits, acc_scale, out_scale, w_scale, block_done, 0)


def _weight_tag(w: torch.Tensor) -> Optional[str]:
    """gemm_spec's ``weight``: 's8' for int8 weights (INT8 weight-only), else None."""
    return "s8" if w.dtype == torch.int8 else None


def _spec_types(a: torch.Tensor, layer_typed: Optional[torch.Tensor]) -> tuple[str, Optional[str]]:
    """gemm_spec's (dtype, operand) for A operand ``a``: with FP8 the layer's type is that of ``layer_typed`` (the
    bias, or GEMM2's output; bf16 when GEMM1 has no bias: its type then never enters the code)."""
    if a.dtype != _ref.FP8_DTYPE:  # FP8 operands: sm90ws only (fp8_config), scaled per expert (MoeGemmArgs)
        return DTYPE_TAG[a.dtype], None
    return DTYPE_TAG[layer_typed.dtype if layer_typed is not None else torch.bfloat16], "e4m3"


@_moe_gemm1_op.register_fake
def _(x, fc1, sorted_ids, block_expert, num_padded, out, topk, activation, fc1_bias, swiglu_alpha, swiglu_beta,
      swiglu_limit, slot_rows, kernel, block_m, block_n, block_k, stages, k_splits, cluster_m, acc_scale=None,
      out_scale=None, w_scale=None, block_done=None) -> None:
    return None


@custom_op("jitmoe::moe_gemm2", mutates_args=("out",))
def _moe_gemm2_op(inter: torch.Tensor, fc2: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                  num_padded: torch.Tensor, slot_weights: Optional[torch.Tensor], out: torch.Tensor,
                  fc2_bias: Optional[torch.Tensor], kernel: str, block_m: int, block_n: int, block_k: int,
                  stages: int, k_splits: int, cluster_m: int, acc_scale: Optional[torch.Tensor] = None,
                  w_scale: Optional[torch.Tensor] = None, block_done: Optional[torch.Tensor] = None,
                  block_done_n_blocks: int = 0) -> None:
    # acc_scale: FP8 only (inter and fc2 in e4m3, out in the layer's type); w_scale: INT8 weight-only (int8 fc2).
    # See gemm2_reference. block_done, block_done_n_blocks: see launch_gemm2.
    if not inter.is_cuda:
        gemm2_reference(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out, fc2_bias, block_m,
                        acc_scale, w_scale)
        return
    _check_aligned(inter=inter, fc2=fc2, out=out)
    cfg = _config_of(kernel, block_m, block_n, block_k, stages, k_splits, cluster_m)
    dtype, operand = _spec_types(inter, out)
    spec = gemm_spec(cfg, dtype, "gemm2", "Identity", device_archs(inter.device), operand, _weight_tag(fc2))
    partials, _, _ = _scratch(cfg, out.shape[0], out.shape[1], inter, 0, 0, fc2.shape[0], gemm1=False)
    load_module(spec).run(inter, fc2, fc2_bias, out, sorted_ids, block_expert, num_padded, slot_weights, None, None,
                          None, out.shape[0], 1, out.shape[1], inter.shape[1], partials, None, None, False, k_splits,
                          acc_scale, None, w_scale, block_done, block_done_n_blocks)


@_moe_gemm2_op.register_fake
def _(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out, fc2_bias, kernel, block_m, block_n,
      block_k, stages, k_splits, cluster_m, acc_scale=None, w_scale=None, block_done=None,
      block_done_n_blocks=0) -> None:
    return None


# --------------------------------------------------------------------------------------------------------------
# Public functions


def moe_gemm1(x, fc1, sorted_ids, block_expert, num_padded, *, out, topk, activation="Swiglu", fc1_bias=None,
              swiglu_alpha=None, swiglu_beta=None, swiglu_limit=None, config: GemmConfig) -> torch.Tensor:
    """GEMM1 of the fused MoE: ``out[p] = act(x[sorted_ids[p] // topk] @ fc1[e]^T + fc1_bias[e])`` for every real
    row p < num_padded (e = block_expert[p // block_m]); padding rows of ``out`` hold unspecified values.

    x [T, K]; fc1 [E, 2N, K] (up rows, then gate rows) for gated activations, else [E, N, K]; out [m_pad_max, N];
    sorted_ids int32 [m_pad_max]; block_expert int32 [m_pad_max / block_m]; num_padded int32 [1] (on the device);
    swiglu_alpha/beta/limit float32 [E] or None. Returns ``out``.
    """
    activation = activation_name(activation)
    params = {"swiglu_alpha": swiglu_alpha, "swiglu_beta": swiglu_beta, "swiglu_limit": swiglu_limit}
    _check_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out, topk, activation, fc1_bias, params, config)
    return launch_gemm1(x, fc1, sorted_ids, block_expert, num_padded, out=out, topk=topk, activation=activation,
                        fc1_bias=fc1_bias, config=config, **params)


def gathers_a(config: GemmConfig, num_slots: int, num_experts: int) -> bool:
    """Whether GEMM1 on ``config`` with ``num_slots`` rows over ``num_experts`` local experts first gathers x into
    a sorted copy, through every slot's sorted row (which moe_align can write for it). The other kernels read x in
    place; sm90ws does too with few rows per expert (DIRECT_A_MAX_ROWS_PER_EXPERT)."""
    return config.kernel in TMA_A_KERNELS and num_slots > DIRECT_A_MAX_ROWS_PER_EXPERT * num_experts


# GEMM2 overlaps GEMM1's last wave (overlaps_gemm2) only while GEMM1's tiles fill at most this many waves of CTAs:
# the overlap saves a share of one wave, while every tile pays a fence (GEMM1) and every unit a counter load (GEMM2).
# Same-run A/B on the H100, layer in graph replay (benchmarks/results/h100-2026-11-24-session29/): Qwen3 and OLMoE at
# T = 16 to 1024 (3.5 to 7.8 waves) 0.4-1.6% faster, Mixtral T = 16/256 (6.8) 0.3-0.5%; 13.6 waves and more
# (DeepSeek-V3 from T = 16, Mixtral from T = 1024, everything at T = 4096 and 16384) 0.0-7.6% slower.
OVERLAP_MAX_WAVES = 8.0


def overlaps_gemm2(config1: GemmConfig, config2: GemmConfig, num_slots: int, num_experts: int, inter: int,
                   num_sms: int) -> bool:
    """Whether GEMM2 on ``config2`` should start on GEMM1's finished M blocks while GEMM1 (on ``config1``, N =
    ``inter``) still runs (per-block completion counters, launch_gemm1/launch_gemm2 ``block_done``): both on
    sm90ws, neither split, and GEMM1's ``expected_tiles`` at most OVERLAP_MAX_WAVES waves of ``num_sms``.
    JITMOE_BLOCK_DONE=0 in the environment turns it off, =1 on wherever it can run (A/B timing)."""
    if not (config1.kernel == config2.kernel == "sm90ws" and config1.k_splits == config2.k_splits == 1):
        return False
    forced = os.environ.get("JITMOE_BLOCK_DONE")
    if forced in ("0", "1"):
        return forced == "1"
    tiles = expected_tiles(num_slots, num_experts, inter, config1.block_m, config1.block_n)
    return tiles <= OVERLAP_MAX_WAVES * num_sms


def launch_gemm1(x, fc1, sorted_ids, block_expert, num_padded, *, out, topk, activation: str, fc1_bias,
                 config: GemmConfig, swiglu_alpha=None, swiglu_beta=None, swiglu_limit=None,
                 slot_rows=None, acc_scale=None, out_scale=None, w_scale=None, block_done=None) -> torch.Tensor:
    """moe_gemm1 without its argument checks (``activation`` a canonical name), for a caller that made every
    argument itself: the fused pipeline, whose own checks already cost its eager call tens of microseconds.
    ``slot_rows``: int32 [T * k], every slot's sorted row as moe_align wrote it (see ``gathers_a``).
    FP8 (x, fc1 and out e4m3, ``fp8_config``): ``acc_scale`` float32 [E] and ``out_scale`` [1] or [E]. INT8
    weight-only (int8 fc1, sm80 or sm90ws kernel): ``w_scale`` [E, n_b], fp32 or x's dtype.
    ``block_done`` (sm90ws, ``overlaps_gemm2``): int32 [m_pad_max // block_m], zeroed by moe_align
    (permute.align_into(..., block_done=)); the launch counts each stored tile in its M block's counter, for a
    launch_gemm2 right after it given the same counters."""
    _moe_gemm1_op(x, fc1, sorted_ids, block_expert, num_padded, out, topk, activation, fc1_bias, swiglu_alpha,
                  swiglu_beta, swiglu_limit, slot_rows, config.kernel, config.block_m, config.block_n,
                  config.block_k, config.stages, config.k_splits, config.cluster_m, acc_scale, out_scale, w_scale,
                  block_done)
    return out


def moe_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, *, out, fc2_bias=None,
              config: GemmConfig) -> torch.Tensor:
    """GEMM2 of the fused MoE: ``out[s] = slot_weights[s] * (inter[p] @ fc2[e]^T + fc2_bias[e])`` with s =
    sorted_ids[p], for every real row p < num_padded. Rows of ``out`` whose slot has no real row are not written.

    inter [m_pad_max, K]; fc2 [E, N, K]; out [num_slots, N]; slot_weights float32 [num_slots] (None: 1). Returns out.
    """
    _check_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out, fc2_bias, config)
    return launch_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out=out, fc2_bias=fc2_bias,
                        config=config)


def launch_gemm2(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, *, out, fc2_bias,
                 config: GemmConfig, acc_scale=None, w_scale=None, block_done=None,
                 gemm1_config: Optional[GemmConfig] = None) -> torch.Tensor:
    """moe_gemm2 without its argument checks (see launch_gemm1; FP8: inter and fc2 e4m3, ``acc_scale`` [E]; INT8
    weight-only: int8 fc2, ``w_scale`` [E, N]). ``block_done``: the counters that the launch_gemm1 just before
    counted into, with that launch's ``gemm1_config``: each A block is then loaded as soon as GEMM1 has stored all
    of its tiles, not after the whole of GEMM1."""
    n_blocks = -(-inter.shape[1] // gemm1_config.block_n) if block_done is not None else 0
    _moe_gemm2_op(inter, fc2, sorted_ids, block_expert, num_padded, slot_weights, out, fc2_bias, config.kernel,
                  config.block_m, config.block_n, config.block_k, config.stages, config.k_splits, config.cluster_m,
                  acc_scale, w_scale, block_done, n_blocks)
    return out


# --------------------------------------------------------------------------------------------------------------
# Prewarm: every GEMM spec the pipeline can pick (each activation for GEMM1, plus GEMM2) at every default config.


def _prewarm_specs(dtypes, topks, archs) -> list[KernelSpec]:
    del topks  # top-k is a run-time value of these kernels
    specs = []
    for arch in dict.fromkeys(normalize_arch(a) for a in archs):
        for kernel in kernels_for_arch(arch):
            for dtype in (d for d in dtypes if d in ("bf16", "fp16")):
                specs += _layer_specs(kernel, arch, dtype)
        if "fp8" in dtypes and "sm90ws" in kernels_for_arch(arch):
            # FP8 with bf16 output and no bias (the layer type then only types GEMM2's output); fp16 outputs and
            # biases build on first use.
            specs += _layer_specs("sm90ws", arch, "bf16", operand="e4m3")
        if "int8" in dtypes:  # INT8 weight-only, bf16 activations, on the kernels the pipeline picks for them
            for kernel in (k for k in kernels_for_arch(arch) if k in S8_KERNELS):
                specs += _layer_specs(kernel, arch, "bf16", weight="s8")
    return specs


def _layer_specs(kernel: str, arch: str, dtype: str, operand: Optional[str] = None,
                 weight: Optional[str] = None) -> list[KernelSpec]:
    """GEMM1 for every activation and GEMM2, at every default config of ``kernel``."""
    form = fp8_config if operand else (lambda cfg: cfg)
    s8 = weight == "s8"
    specs = []
    for act in ACTIVATIONS:
        specs += [gemm_spec(form(cfg), dtype, "gemm1", act, (arch,), operand, weight)
                  for cfg in default_configs(kernel, arch, gated=act in GATED_ACTIVATIONS, s8=s8)]
    return specs + [gemm_spec(form(cfg), dtype, "gemm2", "Identity", (arch,), operand, weight)
                    for cfg in default_configs(kernel, arch, gated=False, s8=s8)]


PREWARM = {"fused_moe": _prewarm_specs}
