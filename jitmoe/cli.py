"""`jitmoe` command line: prewarm the cache, inspect or clear it, show the environment, run the demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from . import env


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as exc:
        print(f"jitmoe: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jitmoe", description="JIT-compiled CUDA MoE kernels: cache and tools")
    sub = p.add_subparsers(dest="command")

    pw = sub.add_parser("prewarm", help="build kernels into the cache ahead of time")
    pw.add_argument("--op", default="all", help="comma list of ops (see --list-ops), or 'all'")
    pw.add_argument("--dtype", default="bf16,fp16",
                    help="comma list of fp32,bf16,fp16,fp8,int8 (fp8: the FP8 fused-MoE GEMMs and decode kernels "
                         "with bf16 output, sm_90a; int8: the INT8 weight-only ones with bf16 activations)")
    pw.add_argument("--topk", default="1,2,8", help="comma list of top-k values")
    pw.add_argument("--arch", default=None, help="comma list such as 80,90a (default: this machine's GPUs)")
    pw.add_argument("-j", "--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="modules built in parallel")
    pw.add_argument("--dry-run", action="store_true", help="list specs, keys and cache paths; build nothing")
    pw.add_argument("--check", action="store_true",
                    help="only nvcc -c the kernel sources (no torch CUDA build needed; nothing is cached)")
    pw.add_argument("--list-ops", action="store_true", help="print the ops prewarm knows and exit")
    pw.set_defaults(func=_cmd_prewarm)

    cache = sub.add_parser("cache", help="inspect or clear the kernel cache")
    csub = cache.add_subparsers(dest="cache_command")
    ci = csub.add_parser("info", help="cache dir, size, toolchain")
    ci.add_argument("--json", action="store_true")
    ci.set_defaults(func=_cmd_cache_info)
    cl = csub.add_parser("list", help="cached modules with their status")
    cl.add_argument("--json", action="store_true")
    cl.add_argument("--stale", action="store_true", help="only stale or incomplete entries")
    cl.set_defaults(func=_cmd_cache_list)
    cc = csub.add_parser("clear", help="remove cached modules and tuning choices (keys being built are skipped)")
    cc.add_argument("--stale", action="store_true", help="only stale/incomplete entries, dead builds' temp dirs and "
                                                         "tuning stores of other jitmoe/torch versions")
    cc.set_defaults(func=_cmd_cache_clear)

    e = sub.add_parser("env", help="JITMOE_* variables, toolchain and cache")
    e.set_defaults(func=_cmd_env)
    d = sub.add_parser("demo", help="route and run a small MoE layer; prints error vs reference and timings")
    d.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    d.set_defaults(func=_cmd_demo)
    return p


# -- prewarm -----------------------------------------------------------------------------------------------------
def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _prewarm_specs(args) -> list:
    from .jit import device_archs, normalize_arch
    from .ops import prewarm_registry

    registry = prewarm_registry()
    ops = sorted(registry) if args.op == "all" else _split(args.op)
    unknown = [o for o in ops if o not in registry]
    if unknown:
        raise ValueError(f"--op: unknown {unknown}; known: {sorted(registry)}")
    dtypes = _split(args.dtype)
    bad = [d for d in dtypes if d not in ("fp32", "bf16", "fp16", "fp8", "int8")]
    if bad:
        raise ValueError(f"--dtype: expected fp32/bf16/fp16/fp8/int8, got {bad}")
    topks = [int(k) for k in _split(args.topk)]
    if args.arch:
        archs = [normalize_arch(a) for a in _split(args.arch)]
    else:
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--arch: no CUDA device here; name the archs to cross-compile for, e.g. --arch 80,90a")
        archs = list(device_archs())
    specs, seen = [], set()
    for op in ops:
        for spec in registry[op](dtypes, topks, archs):
            if spec not in seen:
                seen.add(spec)
                specs.append(spec)
    return specs


def _cmd_prewarm(args) -> int:
    if args.list_ops:
        from .ops import prewarm_registry
        print("\n".join(sorted(prewarm_registry())))
        return 0
    specs = _prewarm_specs(args)
    if args.dry_run:
        return _prewarm_dry_run(specs)
    worker = _check_one if args.check else _build_one
    jobs = max(1, min(args.jobs, len(specs) or 1))
    per_build = max(1, env.max_jobs() // jobs)
    print(f"jitmoe prewarm: {len(specs)} specs, {jobs} in parallel, {per_build} compile jobs each"
          f"{' (nvcc -c check only)' if args.check else ''}", flush=True)
    start, rows, failed = time.perf_counter(), [], 0
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(worker, s.to_dict(), per_build): s for s in specs}
        for i, fut in enumerate(as_completed(futures), 1):
            spec = futures[fut]
            try:
                status, seconds = fut.result()
            except Exception as exc:  # noqa: BLE001 - report every failure, keep building the rest
                failed += 1
                status, seconds = "FAILED", 0.0
                print(f"[{i}/{len(specs)}] FAILED {spec.readable_name}: {exc}", flush=True)
            else:
                print(f"[{i}/{len(specs)}] {status:7s} {spec.readable_name} {seconds:6.1f} s "
                      f"(elapsed {time.perf_counter() - start:6.1f} s)", flush=True)
            rows.append((spec.readable_name, status, seconds))
    print("\nspec".ljust(64) + "status    seconds")
    for name, status, seconds in sorted(rows):
        print(f"{name:63s} {status:9s} {seconds:7.1f}")
    print(f"{len(rows) - failed} ok, {failed} failed, {time.perf_counter() - start:.1f} s total")
    return 1 if failed else 0


def _prewarm_dry_run(specs) -> int:
    from .jit.build import resolve
    for spec in specs:
        entry = resolve(spec)
        state = "cached" if (entry.dir / "meta.json").is_file() else "to build"
        print(f"{spec.readable_name:60s} {entry.key[:16]}  {state:8s}  {entry.dir}")
    print(f"{len(specs)} specs")
    return 0


def _build_one(spec_dict: dict, per_build_jobs: int):
    os.environ["JITMOE_MAX_JOBS"] = str(per_build_jobs)
    from .jit import KernelSpec, build_only
    _, seconds, built = build_only(KernelSpec.from_dict(spec_dict))
    return ("built" if built else "cached"), seconds


def _check_one(spec_dict: dict, per_build_jobs: int):
    from .jit import KernelSpec, compile_cuda_sources
    start = time.perf_counter()
    compile_cuda_sources(KernelSpec.from_dict(spec_dict))
    return "checked", time.perf_counter() - start


# -- cache / env -------------------------------------------------------------------------------------------------
def _cmd_cache_info(args) -> int:
    from .jit.cache import info
    data = info()
    print(json.dumps(data, indent=1) if args.json else "\n".join(f"{k:14s} {v}" for k, v in data.items()))
    return 0


def _cmd_cache_list(args) -> int:
    from .jit.cache import iter_entries
    entries = [e for e in iter_entries() if not args.stale or e.status in ("stale", "incomplete")]
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=1))
        return 0
    for e in entries:
        print(f"{e.status:10s} {e.size_bytes / 2**20:7.1f} MB {e.build_seconds:6.1f} s  {e.spec}")
    print(f"{len(entries)} entries")
    return 0


def _cmd_cache_clear(args) -> int:
    from .jit.cache import clear
    removed = clear(stale_only=args.stale)
    print(f"removed {len(removed)} paths (modules, dead builds' temp dirs, tuning stores)")
    return 0


def _cmd_env(args) -> int:
    for name, desc in env.ENV_VARS.items():
        print(f"{name:26s} = {os.environ.get(name, '')!s:20s} # {desc}")
    from .jit.cache import info
    for k, v in info().items():
        print(f"{k:26s} : {v}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.device)


if __name__ == "__main__":
    sys.exit(main())
