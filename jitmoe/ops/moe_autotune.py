"""Autotuning of the fused-MoE grouped GEMMs: which (GEMM1, GEMM2) tile configs a problem runs with.

    problem key -> stored choice? -> (inside ``jitmoe.autotune()``) candidates -> timing -> choice -> store

- **Key** (``ProblemKey``): format version, arch, SM count, dtype, gated or not, H, I, E_local, top-k and the token
  count rounded up to a power of two (decode T = 1, 2, 3-4, ... and prefill 4096, 8192 each share a choice).
- **Candidates** (``candidate_groups``): GEMM1 and GEMM2 share block_m (it is moe_align's block size), so they come
  in groups, one per (kernel of the arch, block_m tier of that kernel). A group holds each GEMM's tile variants
  (the heuristic's tile plus the other block_n of ``_BLOCK_NS`` with the most stages that fit shared memory) times
  the K splits of split-K kernels (1, 2, 4, 8 while every slice keeps >= 4 k tiles and the GEMM has less than a
  wave of tiles to fill). Tiles the kernel cannot build are left out.
- **Timing**: per group, moe_align runs once on the call's routing; then each GEMM's candidates run on the call's
  real x / weights into scratch outputs (repeated runs are idempotent) and are timed with CUDA events on the
  current stream: ``WARMUP`` calls, then the median of ``REPS``. The group with the smallest GEMM1 + GEMM2 time
  wins. Candidates that fail to build or launch are skipped. Tuning synchronises the host with the device.
- **Cost**: every config not built before is a JIT module, 20-30 s of build on first use; a full tune of one
  dtype and activation on an H100 builds about a dozen beyond the defaults that ``jitmoe prewarm`` builds. Later
  processes find the modules and the choices in the cache.
- **Where choices live**: ``jitmoe.jit.tuning`` store ``fused_moe`` (memory + ``<cache>/tuning/...``). Outside the
  context a stored choice is used when there is one, else the heuristic. ``JITMOE_TUNING=0`` ignores stored choices
  and never tunes. Calls under CUDA-graph capture or torch.compile tracing only look up (a lookup never syncs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .. import env as _env
from ..jit import KernelSpec, UnsupportedSpecError, normalize_arch
from ..jit.tuning import TuningStore
from . import moe_gemm as _gemm
from . import permute as _permute
from ._validate import DTYPE_TAG, check_choice, check_int
from .moe_gemm import GemmConfig

__all__ = ["ProblemKey", "problem_key", "tokens_bucket", "candidate_groups", "lookup", "session", "store",
           "options", "tuning_enabled"]

log = logging.getLogger("jitmoe.autotune")

FORMAT_VERSION = 1  # bump when the key or the candidate space changes meaning
STORE_NAME = "fused_moe"
WARMUP, REPS = 2, 7
_SPLITS = (1, 2, 4, 8)
_MIN_SLICE_TILES = 4
# block_n tried per (kernel, gated): gated tiles read two B halves, so they stay narrower.
_BLOCK_NS = {("sm80", True): (64, 128), ("sm80", False): (64, 128), ("sm90", True): (64, 128),
             ("sm90", False): (64, 128), ("sm90ws", True): (128,), ("sm90ws", False): (128, 256)}
# (fewest stages the kernel allows, most stages tried)
_STAGES = {"sm80": (2, 4), "sm90": (3, 4), "sm90ws": (2, 6)}
# A candidate that raises one of these (unsupported tile, failed build, launch error, out of memory) is skipped.
_SKIPPABLE = (UnsupportedSpecError, RuntimeError, ValueError)

Timer = Callable[[Callable[[], object], tuple], float]  # (run, (gemm name, GemmConfig)) -> milliseconds


def tuning_enabled() -> bool:
    """False when JITMOE_TUNING is 0/false/no/off (jitmoe.env): stored choices are ignored, nothing is tuned."""
    return _env.tuning_enabled()


# -- the problem key -------------------------------------------------------------------------------------------------
class ProblemKey(NamedTuple):
    arch: str
    num_sms: int
    dtype: str          # 'bf16' | 'fp16'
    gated: bool         # GEMM1's B has two halves (gated activation)
    hidden: int
    inter: int
    num_local_experts: int
    topk: int
    tokens: int         # tokens_bucket(num_tokens)

    @property
    def text(self) -> str:
        """The store key, e.g. 'v1/90a/sm132/bf16/gated/H4096/I14336/E8/k2/T64'."""
        return (f"v{FORMAT_VERSION}/{self.arch}/sm{self.num_sms}/{self.dtype}/{'gated' if self.gated else 'plain'}/"
                f"H{self.hidden}/I{self.inter}/E{self.num_local_experts}/k{self.topk}/T{self.tokens}")


def tokens_bucket(num_tokens: int) -> int:
    """The next power of two >= num_tokens (1 for 0 and 1)."""
    check_int("num_tokens", num_tokens, low=0)
    return 1 << max(0, num_tokens - 1).bit_length()


def problem_key(*, arch: str, num_sms: int, dtype, gated: bool, hidden: int, inter: int, num_local_experts: int,
                topk: int, num_tokens: int) -> ProblemKey:
    tag = DTYPE_TAG.get(dtype, dtype)
    check_choice("dtype", tag, ("bf16", "fp16"))
    for name, value in (("num_sms", num_sms), ("hidden", hidden), ("inter", inter),
                        ("num_local_experts", num_local_experts), ("topk", topk)):
        check_int(name, value, low=1)
    if not isinstance(gated, bool):
        raise TypeError(f"gated: expected a bool, got {type(gated).__name__}")
    return ProblemKey(normalize_arch(arch), num_sms, tag, gated, hidden, inter, num_local_experts, topk,
                      tokens_bucket(num_tokens))


# -- candidates ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """Candidates sharing one moe_align block size: GEMM1's and GEMM2's, heuristic-like tiles first."""

    kernel: str
    block_m: int
    gemm1: tuple[GemmConfig, ...]
    gemm2: tuple[GemmConfig, ...]


def _fit(cfg: GemmConfig, arch: str, gated: bool) -> Optional[GemmConfig]:
    """``cfg`` with the most stages, up to its own, that fit the arch's shared memory; None if none does."""
    fewest = _STAGES[cfg.kernel][0]
    for stages in range(cfg.stages, fewest - 1, -1):
        fitted = dataclasses.replace(cfg, stages=stages)
        if _gemm.smem_bytes(fitted, gated) <= _gemm.smem_limit(arch):
            return fitted
    return None


def _buildable(cfg: GemmConfig, arch: str, gated: bool) -> bool:
    mode, act = ("gemm1", "Swiglu") if gated else ("gemm2", "Identity")
    try:
        _gemm.gemm_spec(cfg, "bf16", mode, act, (arch,))
    except UnsupportedSpecError:
        return False
    return True


def tile_variants(kernel: str, block_m: int, arch: str, gated: bool, variants: bool = True,
                  rows_per_expert: float = float("inf")) -> list[GemmConfig]:
    """The heuristic's tile for (kernel, block_m) at ``rows_per_expert`` first, then (``variants``) the other
    block_n of _BLOCK_NS and, on sm90ws, the heuristic's tile with the other cluster size."""
    base = _gemm.heuristic_tile(kernel, block_m, arch, gated, rows_per_expert)
    tiles = [base]
    if not variants:
        return tiles
    others = [_fit(dataclasses.replace(base, block_n=block_n, stages=_STAGES[kernel][1]), arch, gated)
              for block_n in _BLOCK_NS[(kernel, gated)]]
    if kernel == "sm90ws":
        others.append(dataclasses.replace(base, cluster_m=3 - base.cluster_m))
    for cfg in others:
        if cfg is not None and cfg not in tiles and _buildable(cfg, arch, gated):
            tiles.append(cfg)
    return tiles


def split_variants(cfg: GemmConfig, k: int, tiles: int, num_sms: int) -> list[GemmConfig]:
    """``cfg`` with each K split of _SPLITS that keeps _MIN_SLICE_TILES k tiles per slice and is needed to fill
    the GPU (the next smaller split still leaves SMs idle); only 1 for kernels without split-K."""
    if cfg.kernel not in _gemm.SPLIT_K_KERNELS:
        return [cfg]
    k_tiles = -(-k // cfg.block_k)
    return [dataclasses.replace(cfg, k_splits=s) for s in _SPLITS
            if s == 1 or (k_tiles >= s * _MIN_SLICE_TILES and tiles * (s // 2) < num_sms)]


def _gemm_candidates(key: ProblemKey, kernel: str, block_m: int, gated: bool, n: int, k: int,
                     variants: bool) -> tuple[GemmConfig, ...]:
    num_slots = key.tokens * key.topk
    rows_per_expert = num_slots / key.num_local_experts
    return tuple(split for tile in tile_variants(kernel, block_m, key.arch, gated, variants, rows_per_expert)
                 for split in split_variants(tile, k, _gemm.expected_tiles(num_slots, key.num_local_experts, n,
                                                                           block_m, tile.block_n), key.num_sms))


def candidate_groups(key: ProblemKey, *, kernels=None, variants: bool = True) -> list[Group]:
    """Every (kernel, block_m) group for ``key``; ``kernels`` restricts the kernels, ``variants=False`` keeps only
    the heuristic's tiles (and their K splits), i.e. modules that ``jitmoe prewarm`` already built."""
    groups = []
    for kernel in _gemm.kernels_for_arch(key.arch):
        if kernels is not None and kernel not in kernels:
            continue
        for bm in dict.fromkeys(c.block_m for c in _gemm.default_configs(kernel, key.arch, key.gated)):
            groups.append(Group(kernel, bm,
                                _gemm_candidates(key, kernel, bm, key.gated, key.inter, key.hidden, variants),
                                _gemm_candidates(key, kernel, bm, False, key.hidden, key.inter, variants)))
    return groups


# -- timing ----------------------------------------------------------------------------------------------------------
class Workload(NamedTuple):
    """The tensors of one fused-MoE call, as the pipeline holds them (outputs excluded: tuning writes scratch)."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    slot_weights: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2_bias: Optional[torch.Tensor]
    act_params: dict
    activation: str
    local_expert_offset: int


@dataclass(frozen=True)
class Choice:
    gemm1: GemmConfig
    gemm2: GemmConfig
    gemm1_ms: float
    gemm2_ms: float

    @property
    def configs(self) -> tuple[GemmConfig, GemmConfig]:
        return self.gemm1, self.gemm2


def cuda_event_timer(run: Callable[[], object], candidate: tuple = (), *, warmup: int = WARMUP,
                     reps: int = REPS) -> float:
    """Median milliseconds of ``run`` over ``reps`` CUDA-event pairs on the current stream, after ``warmup``
    calls (the first of which may build the candidate's module). Waits for the device."""
    del candidate
    for _ in range(warmup):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        run()
        end.record()
    events[-1][1].synchronize()
    import statistics  # here, not at the top: it costs a warm first call ~5 ms of imports and only tuning needs it
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _fastest(name: str, configs, run: Callable[[GemmConfig], object], timer: Timer):
    """(config, ms) of the fastest candidate that runs (the first on ties), or None."""
    best = None
    for cfg in configs:
        try:
            ms = timer(lambda: run(cfg), (name, cfg))
        except _SKIPPABLE as exc:
            log.warning("autotune: skipping %s %s: %s", name, cfg, str(exc).splitlines()[0] if str(exc) else exc)
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    return best


def measure_group(work: Workload, group: Group, timer: Timer) -> Optional[Choice]:
    """Align once at the group's block_m, then time GEMM1's and GEMM2's candidates on the call's tensors."""
    x, num_tokens, topk = work.x, work.topk_ids.shape[0], work.topk_ids.shape[1]
    num_local, hidden, inter = work.fc2.shape
    routing = _permute.empty_align_outputs(num_tokens * topk, num_local, group.block_m, x.device)
    _permute.align_into(work.topk_ids, num_local, group.block_m, work.local_expert_offset, routing)
    sorted_ids, block_expert, num_padded, _ = routing
    h = torch.empty(sorted_ids.shape[0], inter, dtype=x.dtype, device=x.device)
    out = torch.empty(num_tokens * topk, hidden, dtype=x.dtype, device=x.device)
    best1 = _fastest("gemm1", group.gemm1, lambda cfg: _gemm.moe_gemm1(
        x, work.fc1, sorted_ids, block_expert, num_padded, out=h, topk=topk, activation=work.activation,
        fc1_bias=work.fc1_bias, config=cfg, **work.act_params), timer)
    if best1 is None:
        return None
    # h now holds real GEMM1 rows, so GEMM2 is timed on realistic data.
    best2 = _fastest("gemm2", group.gemm2, lambda cfg: _gemm.moe_gemm2(
        h, work.fc2, sorted_ids, block_expert, num_padded, work.slot_weights, out=out, fc2_bias=work.fc2_bias,
        config=cfg), timer)
    if best2 is None:
        return None
    return Choice(best1[0], best2[0], best1[1], best2[1])


def tune(work: Workload, key: ProblemKey, *, timer: Optional[Timer] = None, kernels=None,
         variants: bool = True) -> Optional[Choice]:
    """The group with the smallest GEMM1 + GEMM2 time (the first on ties), or None when no candidate ran."""
    timer = timer or cuda_event_timer
    best = None
    for group in candidate_groups(key, kernels=kernels, variants=variants):
        choice = measure_group(work, group, timer)
        if choice is not None and (best is None or choice.gemm1_ms + choice.gemm2_ms < best.gemm1_ms + best.gemm2_ms):
            best = choice
    return best


# -- stored choices --------------------------------------------------------------------------------------------------
_STORE: Optional[TuningStore] = None
_DECODED: dict = {}  # key text -> (stored value, its configs or None): each value is decoded once
_FAILED: set = set()  # keys whose tuning found no runnable candidate in this process


def store() -> TuningStore:
    global _STORE
    if _STORE is None:
        _STORE = TuningStore(STORE_NAME)
    return _STORE


def encode(choice: Choice) -> dict:
    return {"gemm1": dataclasses.asdict(choice.gemm1), "gemm2": dataclasses.asdict(choice.gemm2),
            "ms": [round(choice.gemm1_ms, 6), round(choice.gemm2_ms, 6)]}


def _choice_problem(cfg1: GemmConfig, cfg2: GemmConfig, key: ProblemKey) -> Optional[str]:
    """Why a stored pair cannot run this problem, or None: it must be among the problem's candidates (which
    only holds tiles the kernels build and splits they run)."""
    if (cfg1.kernel, cfg1.block_m) != (cfg2.kernel, cfg2.block_m):
        return "GEMM1 and GEMM2 differ in kernel or block_m"
    for group in candidate_groups(key):
        if (group.kernel, group.block_m) == (cfg1.kernel, cfg1.block_m):
            return None if cfg1 in group.gemm1 and cfg2 in group.gemm2 else "not among the problem's candidates"
    return f"no {cfg1.kernel} kernel with block_m {cfg1.block_m} on arch {key.arch}"


def decode(value, key: ProblemKey) -> Optional[tuple[GemmConfig, GemmConfig]]:
    """The (GEMM1, GEMM2) configs of a stored value, or None (with a warning) when it is not a valid choice."""
    try:
        cfg1, cfg2 = (GemmConfig(**value[name]) for name in ("gemm1", "gemm2"))
        problem = _choice_problem(cfg1, cfg2, key)
    except (TypeError, KeyError, ValueError) as exc:
        problem = f"malformed ({exc})"
    if problem:
        warnings.warn(f"jitmoe: ignoring the stored tuning choice for {key.text}: {problem}", RuntimeWarning)
        return None
    return cfg1, cfg2


def lookup(key: ProblemKey) -> Optional[tuple[GemmConfig, GemmConfig]]:
    """The stored (GEMM1, GEMM2) configs for ``key`` (memory, else the store's file), or None. No device work;
    each stored value is decoded and checked once."""
    return _lookup(key, key.text) if tuning_enabled() else None


def _lookup(key: ProblemKey, text: str) -> Optional[tuple[GemmConfig, GemmConfig]]:
    value = store().get(text)
    if value is None:
        return None
    memo = _DECODED.get(text)
    if memo is None or memo[0] is not value:
        memo = _DECODED[text] = (value, decode(value, key))
    return memo[1]


def record(key: ProblemKey, choice: Choice) -> None:
    store().put(key.text, encode(choice))
    log.info("autotune: %s -> %s + %s (%.4f + %.4f ms)", key.text, choice.gemm1, choice.gemm2, choice.gemm1_ms,
             choice.gemm2_ms)


# -- the autotune session and the pipeline's entry point -------------------------------------------------------------
@dataclass
class Options:
    """Candidate-space and timer overrides, for tests and benchmarks (``options``)."""

    kernels: Optional[tuple] = None
    variants: bool = True
    timer: Optional[Timer] = None


_OPTIONS = Options()
_tune_mode = False  # True inside ``session(True)``: calls without a stored choice measure one


@contextlib.contextmanager
def options(*, kernels=None, variants: bool = True, timer: Optional[Timer] = None):
    """Restrict the candidates (``kernels``, ``variants``) or replace the timer inside the context."""
    global _OPTIONS
    if kernels is not None:
        kernels = tuple(kernels)
        for k in kernels:
            check_choice("kernels", k, _gemm.KERNELS)
    if not isinstance(variants, bool):
        raise TypeError(f"variants: expected a bool, got {type(variants).__name__}")
    if timer is not None and not callable(timer):
        raise TypeError(f"timer: expected a callable, got {type(timer).__name__}")
    previous, _OPTIONS = _OPTIONS, Options(kernels, variants, timer)
    try:
        yield
    finally:
        _OPTIONS = previous


def _check_session_args(tune_mode, cache) -> Optional[str]:
    """The cache file path (or None) after checking FlashInfer's arguments."""
    if not isinstance(tune_mode, bool):
        raise TypeError(f"tune_mode: expected a bool, got {type(tune_mode).__name__}")
    if cache is None:
        return None
    if not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache: expected None, a str or an os.PathLike, got {type(cache).__name__}")
    path = os.fspath(cache)
    if not isinstance(path, str):
        raise TypeError(f"cache: expected a str path, got {type(path).__name__}")
    if not path:
        raise ValueError("cache: expected a file path, got ''")
    if os.path.isdir(path):
        raise ValueError(f"cache: expected a file path, got the directory {path!r}")
    return path


@contextlib.contextmanager
def session(tune_mode: bool = True, cache=None):
    """The body of ``jitmoe.autotune``: load ``cache`` (if the file exists), tune (``tune_mode``) or only look
    up inside, and save every choice to ``cache`` on exit when ``tune_mode`` is True."""
    global _tune_mode
    path = _check_session_args(tune_mode, cache)
    if path is not None and os.path.exists(path):
        store().load_file(path)
    previous, _tune_mode = _tune_mode, tune_mode
    try:
        yield
    finally:
        _tune_mode = previous
        if path is not None and tune_mode:
            store().save_file(path)


def can_tune(x: torch.Tensor) -> bool:
    """Never measure while a CUDA graph is captured or torch.compile traces (fake tensors): look up only."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(x):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


_KEYS: dict = {}  # the call's shape fields -> (ProblemKey, its text): no validation or formatting per call


def key_of(work: Workload, arch: str, num_sms: int) -> tuple[ProblemKey, str]:
    num_tokens, topk = work.topk_ids.shape
    fields = (arch, num_sms, work.x.dtype, work.activation, tuple(work.fc2.shape), topk,
              1 << max(0, num_tokens - 1).bit_length())
    found = _KEYS.get(fields)
    if found is None:
        num_local, hidden, inter = work.fc2.shape
        key = problem_key(arch=arch, num_sms=num_sms, dtype=work.x.dtype,
                          gated=work.activation in _gemm.GATED_ACTIVATIONS, hidden=hidden, inter=inter,
                          num_local_experts=num_local, topk=topk, num_tokens=num_tokens)
        found = _KEYS[fields] = (key, key.text)
    return found


def choose(work: Workload, arch: str, num_sms: int) -> Optional[tuple[GemmConfig, GemmConfig]]:
    """The pipeline's entry: the stored configs for this call, else (tuning now) the measured ones, else None
    (the caller falls back to the heuristic)."""
    if not tuning_enabled() or work.topk_ids.shape[0] == 0:
        return None
    key, text = key_of(work, arch, num_sms)
    found = _lookup(key, text)
    if found is not None or not _tune_mode or text in _FAILED or not can_tune(work.x):
        return found
    choice = tune(work, key, timer=_OPTIONS.timer, kernels=_OPTIONS.kernels, variants=_OPTIONS.variants)
    if choice is None:
        _FAILED.add(text)
        return None
    record(key, choice)
    return choice.configs


# -- prewarm: every candidate module of the default activation (Swiglu GEMM1, GEMM2), so a tune builds nothing -------
def _prewarm_specs(dtypes, topks, archs) -> list[KernelSpec]:
    del topks  # top-k is a run-time value of the GEMMs
    specs = []
    for arch in dict.fromkeys(normalize_arch(a) for a in archs):
        for kernel in _gemm.kernels_for_arch(arch):
            for base, rows in itertools.product(_gemm.default_configs(kernel, arch, True), (0.0, float("inf"))):
                for dtype in (d for d in dtypes if d in ("bf16", "fp16")):  # few rows per expert, then many
                    specs += [_gemm.gemm_spec(c, dtype, "gemm1", "Swiglu", (arch,))
                              for c in tile_variants(kernel, base.block_m, arch, True, rows_per_expert=rows)]
                    specs += [_gemm.gemm_spec(c, dtype, "gemm2", "Identity", (arch,))
                              for c in tile_variants(kernel, base.block_m, arch, False, rows_per_expert=rows)]
    return list(dict.fromkeys(specs))


PREWARM = {"fused_moe_autotune": _prewarm_specs}
