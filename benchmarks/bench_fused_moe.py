"""Fused-MoE benchmark (issue 6 item 1; issue 5's first timing): jitmoe against the floor and its peers.

For each model shape of DESIGN.md section 5 and each T, in one run: the ceilings (copy bandwidth, bf16 GEMM peak),
the floor (activated experts' weights read once + activations in/out at copy BW, or 6*T*k*H*I FLOPs at peak,
whichever is larger; activated = distinct experts in the row's actual routing ids), jitmoe.cutlass_fused_moe, a
per-expert torch loop, a torch._grouped_mm pipeline, and the recorded vLLM Triton numbers (anchor JSON, same GPU
model). CUDA-event medians after warm-up; weights and routing rotated among several copies where they fit in memory,
else the L2 is flushed before every call; T <= 256 rows also through CUDA-graph replay. Every implementation's
relative error against an fp32 per-expert reference on the row is recorded.

    python benchmarks/bench_fused_moe.py [--shapes mixtral,deepseek-v3] [--tokens 1,16] [--split-k 1,2,4,8]
                                         [--device cpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import _common as common

ANCHOR = "h100-2026-11-22.json"
# Rows up to this T are also timed through CUDA-graph replay (serving engines capture graphs for batches of this
# size). Eager timing of a call whose kernels take 0.3-0.5 ms is bounded by the host's launch work when the lent
# machine's CPU is slow: one H100 grid read Qwen3 T = 256 at 0.684 ms eager against 0.44 ms in four other runs
# (benchmarks/results/h100-2026-11-23-session18/).
GRAPH_MAX_T = 256


@dataclass(frozen=True)
class MoEShape:
    E: int
    k: int
    H: int
    I: int  # noqa: E741 (the intermediate size is called I throughout the project)


SHAPES = {
    "mixtral-8x7b": MoEShape(8, 2, 4096, 14336),
    "qwen3-30b-a3b": MoEShape(128, 8, 2048, 768),
    "olmoe-molmoe": MoEShape(64, 8, 2048, 1024),
    "deepseek-v3": MoEShape(256, 8, 7168, 2048),
}
# Shapes outside the grid, for checking a tuning decision on cases it was not fitted to (--shapes by name).
HELD_OUT_SHAPES = {
    "mixtral-8x22b": MoEShape(8, 2, 6144, 16384),
    "qwen2-57b-a14b": MoEShape(64, 8, 3584, 2560),
    "deepseek-v2": MoEShape(160, 6, 5120, 1536),
    "qwen3-235b-a22b": MoEShape(128, 8, 4096, 1536),
}
CPU_SHAPES = {"tiny": MoEShape(8, 2, 64, 32), "tiny-fine": MoEShape(16, 4, 32, 16)}
ALIASES = {"mixtral": "mixtral-8x7b", "qwen3": "qwen3-30b-a3b", "olmoe": "olmoe-molmoe", "molmoe": "olmoe-molmoe",
           "deepseek": "deepseek-v3", "dsv3": "deepseek-v3"}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
QUICK_TOKENS = (1, 256, 4096)  # issue 5's first timing
CPU_TOKENS = (1, 5)


# ----------------------------------------------------------------------------------------------- bytes and floors

def weight_bytes(shape: MoEShape, itemsize: int = 2) -> int:
    """All experts' fc1 [E, 2I, H] + fc2 [E, H, I]."""
    return shape.E * 3 * shape.H * shape.I * itemsize


def moe_bytes(distinct_experts: float, T: int, H: int, I: int, itemsize: int = 2) -> float:  # noqa: E741
    """Activated experts' weights read once + activations in [T, H] and out [T, H]."""
    return distinct_experts * 3 * H * I * itemsize + 2 * T * H * itemsize


def moe_flops(T: int, k: int, H: int, I: int) -> int:  # noqa: E741
    return 6 * T * k * H * I


# ----------------------------------------------------------------------------------------------- implementations

def torch_loop_moe(x, ids, scales, w13, w2, compute_dtype: torch.dtype | None = None):
    """Per-expert torch loop (HF style, one host sync for the counts). With ``compute_dtype`` it is the fp32
    reference: inputs and each expert's weights are upcast, everything accumulates in that dtype."""
    T, H = x.shape
    k, I = ids.shape[1], w2.shape[2]  # noqa: E741
    dtype = compute_dtype or x.dtype
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    xs, weights = x.to(dtype), scales.reshape(-1).to(dtype)
    out = torch.zeros(T, H, dtype=dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        tokens = slots // k
        h = xs[tokens] @ w13[expert].to(dtype).t()  # [n, 2I]: up first, gate second
        y = (F.silu(h[:, I:]) * h[:, :I]) @ w2[expert].to(dtype).t()
        out.index_add_(0, tokens, y * weights[slots, None])
    return out


def grouped_mm_moe(x, ids, scales, w13, w2):
    """Sort slots by expert, gather, torch._grouped_mm x2 with SiLU(gate)*up between, weight, index_add (no sync)."""
    E, k, I = w13.shape[0], ids.shape[1], w2.shape[2]  # noqa: E741
    sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(E, device=x.device, dtype=sorted_ids.dtype),
                                 right=True, out_int32=True)  # [E] cumulative group ends
    tokens = order // k
    h = torch._grouped_mm(x.index_select(0, tokens), w13.transpose(1, 2), offs=offsets)
    y = torch._grouped_mm(F.silu(h[:, I:]) * h[:, :I], w2.transpose(1, 2), offs=offsets)
    y = y * scales.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def jitmoe_moe(out: torch.Tensor, extra: dict | None = None, contexts: tuple[Callable, ...] = ()):
    """jitmoe.cutlass_fused_moe writing into ``out``; ``extra`` kwargs and ``contexts`` (factories entered around
    every call) carry a forced split-K or kernel family."""
    op = common.jitmoe_attr("cutlass_fused_moe")

    def run(x, ids, scales, w13, w2, quant_scales=None):  # quant_scales: FP8 and INT8 sets (bench_fused_moe_fp8, _int8)
        with contextlib.ExitStack() as stack:
            for make in contexts:
                stack.enter_context(make())
            return op(x, ids, scales, w13, w2, out.dtype, quant_scales=quant_scales, output=out, **(extra or {}))[0]
    return run


def split_k_variants(values: tuple[int, ...], out: torch.Tensor, contexts: tuple) -> tuple[dict, str]:
    """{split: impl} through whatever knob jitmoe exposes: a ``split_k=`` keyword of cutlass_fused_moe, or a
    ``jitmoe.ops.fused_moe.force_split_k(n)`` context manager. ({}, why) when there is none yet."""
    op = common.jitmoe_attr("cutlass_fused_moe")
    if op is None:
        return {}, "jitmoe.cutlass_fused_moe not available yet"
    if "split_k" in inspect.signature(op).parameters:
        return {s: jitmoe_moe(out, {"split_k": s}, contexts) for s in values}, "cutlass_fused_moe(split_k=...)"
    force = common.jitmoe_attr("ops.fused_moe.force_split_k")
    if force is not None:
        return ({s: jitmoe_moe(out, None, contexts + (functools.partial(force, s),)) for s in values},
                "jitmoe.ops.fused_moe.force_split_k(n)")
    return {}, ("jitmoe exposes no split-K knob yet (looked for cutlass_fused_moe(split_k=) and "
                "jitmoe.ops.fused_moe.force_split_k): sweep skipped")


def kernel_contexts(kernel: str | None) -> tuple[Callable, ...]:
    """Force jitmoe's GEMM family ('sm80' runs the SM80 kernels on an H100; 'decode' the decode path) through
    ops.fused_moe.force_kernel."""
    if not kernel:
        return ()
    force = common.jitmoe_attr("ops.fused_moe.force_kernel")
    if force is None:
        raise SystemExit("--kernel: jitmoe.ops.fused_moe.force_kernel does not exist")
    return (functools.partial(force, kernel),)


def peer_impls(out: torch.Tensor, contexts: tuple) -> tuple[dict, dict]:
    """({name: (fn, graph-capturable)}, {name: why skipped})."""
    impls, skipped = {"torch_loop": (torch_loop_moe, False)}, {}
    if common.jitmoe_attr("cutlass_fused_moe") is not None:
        impls["jitmoe"] = (jitmoe_moe(out, None, contexts), True)
    else:
        skipped["jitmoe"] = "jitmoe.cutlass_fused_moe not available yet: skipped"
    if hasattr(torch, "_grouped_mm"):
        impls["grouped_mm"] = (grouped_mm_moe, True)
    else:
        skipped["grouped_mm"] = f"torch._grouped_mm missing in torch {torch.__version__}: skipped"
    return impls, skipped


# ----------------------------------------------------------------------------------------------- inputs

def make_weights(shape: MoEShape, device, dtype, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fc1 [E, 2I, H] (up; gate) and fc2 [E, H, I], random, scaled so activations stay O(1)."""
    return [(torch.randn(shape.E, 2 * shape.I, shape.H, device=device, dtype=dtype).mul_(shape.H ** -0.5),
             torch.randn(shape.E, shape.H, shape.I, device=device, dtype=dtype).mul_(shape.I ** -0.5))
            for _ in range(copies)]


def make_routing(shape: MoEShape, T: int, device, dtype):
    """x [T, H], softmax-top-k of random logits (renormalised): ids int32 [T, k], scales fp32 [T, k]."""
    x = torch.randn(T, shape.H, device=device, dtype=dtype)
    probs, ids = torch.softmax(torch.randn(T, shape.E, device=device), dim=-1).topk(shape.k, dim=-1)
    return x, ids.to(torch.int32), probs / probs.sum(dim=-1, keepdim=True)


def rotation_copies(shape: MoEShape, device, max_copies: int) -> int:
    """How many weight copies to rotate among (>= 2), or 1: use the L2 flush instead (e.g. DeepSeek-V3 on 80 GB)."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    fit = min(max_copies, int(0.4 * free // weight_bytes(shape)))
    return fit if fit >= 2 else 1


def device_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| on the device in float64 (the rows are too big for a host copy); NaN -> inf."""
    diff = torch.linalg.vector_norm((out.double() - ref.double()))
    err = (diff / torch.linalg.vector_norm(ref.double()).clamp_min(1e-30)).item()
    return err if err == err and err != float("inf") else float("inf")


# ----------------------------------------------------------------------------------------------- timing

def time_moe(fn: Callable, sets: list[tuple], ctx: dict, graph: bool, ref: torch.Tensor | None) -> dict:
    """Median ms over the rotated input sets (first call untimed: JIT load, errors), error vs ``ref``, and
    CUDA-graph replay (one graph per set) when ``graph``."""
    device, calls = ctx["device"], [functools.partial(fn, *s) for s in sets]
    try:
        first = calls[0]()
    except Exception as err:  # a failing implementation is a row note, not the end of the run
        return {"error": f"{type(err).__name__}: {err}"}
    result = {"err": device_rel_error(first, ref) if ref is not None else None}
    estimate = common.one_call_ms(calls[0], device)
    iters = common.iterations_for(estimate, ctx["budget_ms"], high=ctx["max_iters"])
    warmup = 2 if estimate > 20 else min(10, iters)
    current = {"i": 0}
    result.update(iters=iters, ms=common.time_fn(
        lambda: calls[current["i"]](), device, warmup=warmup, iters=iters, flush_l2=len(calls) < 2,
        setup=lambda i: current.__setitem__("i", i % len(calls)))["median_ms"])
    if graph and device.type == "cuda":
        try:
            result["graph_ms"] = common.time_graphs(calls, iters=iters, flush_l2=len(calls) < 2)["median_ms"]
        except Exception as err:
            result["graph_error"] = f"{type(err).__name__}: {err}"
        torch.cuda.empty_cache()
    return result


def best_ms(result: dict | None) -> float | None:
    times = [t for t in ((result or {}).get("ms"), (result or {}).get("graph_ms")) if t]
    return min(times) if times else None


def measure_row(name: str, shape: MoEShape, T: int, weights: list, ctx: dict) -> dict:
    device, dtype = ctx["device"], ctx["dtype"]
    sets = [make_routing(shape, T, device, dtype) + w for w in weights]
    distinct = sum(s[1].unique().numel() for s in sets) / len(sets)
    floor, bound = common.floor_ms(moe_bytes(distinct, T, shape.H, shape.I, dtype.itemsize),
                                   moe_flops(T, shape.k, shape.H, shape.I), ctx["ceilings"])
    row = {"shape": name, **asdict(shape), "T": T, "copies": len(weights),
           "l2": f"rotate {len(weights)} copies" if len(weights) > 1 else "flush",
           "distinct_experts": distinct,
           "expected_distinct_uniform": common.expected_distinct(shape.E, shape.k, T),
           "floor_ms": floor, "bound": bound, "impls": {}}
    ref = torch_loop_moe(*sets[0], compute_dtype=torch.float32)
    out = torch.empty(T, shape.H, device=device, dtype=dtype)
    impls, skipped = peer_impls(out, ctx["contexts"])
    if ctx["impls"]:
        impls = {name: impl for name, impl in impls.items() if name in ctx["impls"]}
    row["impls"].update({n: {"note": why} for n, why in skipped.items()})
    for impl, (fn, capturable) in impls.items():
        row["impls"][impl] = time_moe(fn, sets, ctx, graph=capturable and T <= GRAPH_MAX_T, ref=ref)
        if not capturable and T <= GRAPH_MAX_T:
            row["impls"][impl]["graph_note"] = "not capturable (host sync for the per-expert counts)"
    if ctx["split_k"]:
        variants, how = split_k_variants(ctx["split_k"], out, ctx["contexts"])
        row["split_k"] = {"knob": how, "ms": {str(s): best_ms(time_moe(fn, sets, ctx, T <= GRAPH_MAX_T, ref))
                                               for s, fn in variants.items()}}
    add_recorded(row, ctx.get("anchor"))
    add_comparisons(row)
    return row


def add_recorded(row: dict, anchor: dict | None) -> None:
    match = next((r for r in (anchor or {}).get("rows", []) if (r["shape"], r["T"]) == (row["shape"], row["T"])),
                 None)
    if match:
        row["recorded"] = {key: match.get(key) for key in
                           ("floor_ms", "naive_ms", "grouped_mm_ms", "vllm_triton_ms", "vllm_kernels_ms")}


def add_comparisons(row: dict) -> None:
    """Floor fraction per implementation, the best peer, jitmoe's speedup over it, and the split-K verdict."""
    times = {impl: best_ms(res) for impl, res in row["impls"].items()}
    recorded = row.get("recorded") or {}
    vllm = [t for t in (recorded.get("vllm_triton_ms"), recorded.get("vllm_kernels_ms")) if t]
    if vllm:
        times["vllm_recorded"] = min(vllm)
    row["best_ms"] = {impl: t for impl, t in times.items() if t}
    row["floor_frac"] = {impl: row["floor_ms"] / t for impl, t in row["best_ms"].items()}
    peers = {impl: t for impl, t in row["best_ms"].items() if impl != "jitmoe"}
    if peers:
        row["best_peer"] = min(peers, key=peers.get)
        if "jitmoe" in row["best_ms"]:
            row["speedup_vs_best_peer"] = peers[row["best_peer"]] / row["best_ms"]["jitmoe"]
    forced = {s: t for s, t in (row.get("split_k") or {}).get("ms", {}).items() if t}
    if forced and "jitmoe" in row["best_ms"]:
        row["split_k"]["heuristic_within_5pct"] = row["best_ms"]["jitmoe"] <= 1.05 * min(forced.values())


# ----------------------------------------------------------------------------------------------- report

def row_verdict(row: dict) -> bool | None:
    """Issue 6: T >= 16 rows need >= 1.3x the best peer or >= 90% of the floor; T = 1 rows no slower than it."""
    speedup, frac = row.get("speedup_vs_best_peer"), row["floor_frac"].get("jitmoe")
    if speedup is None:
        return None
    if row["T"] == 1:
        return speedup >= 1.0
    if row["T"] >= 16:
        return speedup >= 1.3 or (frac or 0) >= 0.9
    return None


def summary(rows: list[dict]) -> dict:
    impls = sorted({impl for r in rows for impl in r["floor_frac"]})
    geo = {impl: common.geomean(r["floor_frac"].get(impl) for r in rows) for impl in impls}
    geo["best_peer"] = common.geomean(r["floor_frac"].get(r["best_peer"]) for r in rows if r.get("best_peer"))
    verdicts = [row_verdict(r) for r in rows]
    jit_rows = sum(1 for r in rows if "jitmoe" in r["floor_frac"])
    targets = [
        {"target": f"geomean floor/time over {jit_rows} rows", "measured": geo.get("jitmoe"), "goal": ">= 0.80",
         "verdict": common.verdict(None if geo.get("jitmoe") is None else geo["jitmoe"] >= 0.80)},
        {"target": "rows T>=16: >=1.3x best peer or >=90% floor; T=1: >= best peer",
         "measured": f"{sum(v is True for v in verdicts)} pass / {sum(v is False for v in verdicts)} miss",
         "goal": "all pass", "verdict": common.verdict(
             None if all(v is None for v in verdicts) else not any(v is False for v in verdicts))},
    ]
    sweep = [r["split_k"].get("heuristic_within_5pct") for r in rows if r.get("split_k")]
    if any(v is not None for v in sweep):
        targets.append({"target": "split-K heuristic within 5% of the best forced value",
                        "measured": f"{sum(v is True for v in sweep)} / {len(sweep)} rows", "goal": "all rows",
                        "verdict": common.verdict(all(v is True for v in sweep))})
    return {"geomean_floor_frac": geo, "targets": targets}


def print_report(rows: list[dict], summ: dict) -> None:
    def ms(row, impl):
        return row["best_ms"].get(impl)

    print("\nFused MoE, bf16 (ms = best of event median and graph replay; frac = floor/time)")
    print(common.markdown_table(
        ["shape", "T", "bound", "floor", "jitmoe", "frac", "loop", "grouped_mm", "vllm rec.", "best peer", "speedup",
         "jit err", "verdict"],
        [(r["shape"], r["T"], r["bound"], r["floor_ms"], ms(r, "jitmoe"), r["floor_frac"].get("jitmoe"),
          ms(r, "torch_loop"), ms(r, "grouped_mm"), ms(r, "vllm_recorded"), r.get("best_peer"),
          r.get("speedup_vs_best_peer"), r["impls"].get("jitmoe", {}).get("err"), common.verdict(row_verdict(r)))
         for r in rows]))
    sweeps = [r for r in rows if r.get("split_k")]
    if sweeps:
        print(f"\nSplit-K sweep ({sweeps[0]['split_k']['knob']})")
        values = sorted({s for r in sweeps for s in r["split_k"]["ms"]}, key=int)
        print(common.markdown_table(["shape", "T", "default"] + [f"split {s}" for s in values] + ["within 5%"],
                                    [[r["shape"], r["T"], ms(r, "jitmoe")] + [r["split_k"]["ms"].get(s) for s in values]
                                     + [r["split_k"].get("heuristic_within_5pct")] for r in sweeps]))
    print("\nGeomean floor/time: " + ", ".join(f"{k} {v:.1%}" for k, v in summ["geomean_floor_frac"].items() if v))
    print(common.markdown_table(["target (issue 6)", "measured", "goal", "verdict"],
                                [(t["target"], t["measured"], t["goal"], t["verdict"]) for t in summ["targets"]]))


def plot(path, rows: list[dict]) -> None:
    panels = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        impls = sorted({impl for r in sel for impl in r["floor_frac"]})
        series = {impl: ([r["T"] for r in sel], [r["floor_frac"].get(impl) for r in sel]) for impl in impls}
        panels.append({"title": shape, "xlabel": "tokens T", "ylabel": "floor / time", "logx": 2,
                       "series": series, "hline": (1.0, "floor")})
    if panels:
        common.plot_panels(path, panels, "fused MoE bf16: fraction of the floor (higher is better)")


# ----------------------------------------------------------------------------------------------- main

def resolve_shapes(text: str | None, device) -> dict[str, MoEShape]:
    """--shapes: names of SHAPES / HELD_OUT_SHAPES / CPU_SHAPES (or ALIASES), or literal E:k:H:I shapes."""
    if not text:
        return dict(CPU_SHAPES if device.type == "cpu" else SHAPES)
    table = {**SHAPES, **HELD_OUT_SHAPES, **CPU_SHAPES}
    chosen = {}
    for raw in text.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if name in table:
            chosen[name] = table[name]
            continue
        fields = name.split(":")
        if len(fields) != 4 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise SystemExit(f"--shapes: unknown shape {raw!r}; known: {sorted(table) + sorted(ALIASES)}, or E:k:H:I")
        E, k, H, I = map(int, fields)  # noqa: E741
        if k > E:
            raise SystemExit(f"--shapes: {raw!r} has top-k {k} > {E} experts")
        chosen[f"E{E}-k{k}-H{H}-I{I}"] = MoEShape(E, k, H, I)
    return chosen


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (aliases {sorted(ALIASES)}), "
                        f"held-out {sorted(HELD_OUT_SHAPES)}, or E:k:H:I")
    parser.add_argument("--tokens", default=None, help=f"comma list of T (default {','.join(map(str, TOKENS))})")
    parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_TOKENS} unless --tokens is given")
    parser.add_argument("--split-k", default=None, help="comma list of forced split-K values to sweep, e.g. 1,2,4,8")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (tiny shapes)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--kernel", choices=("sm80", "sm90", "sm90ws", "decode"), default=None,
                        help="force jitmoe's GEMM family (sm80 on an H100 times the SM80 path; sm90ws the "
                             "persistent kernel at every T; decode the weight-streaming decode path)")
    parser.add_argument("--budget-ms", type=float, default=300.0, help="timed GPU time per implementation and row")
    parser.add_argument("--max-copies", type=int, default=4, help="weight copies rotated to defeat the L2")
    parser.add_argument("--impls", default=None,
                        help="comma list of implementations to time (default all), e.g. jitmoe for a quick run")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    shapes = resolve_shapes(args.shapes, device)
    tokens = (common.parse_ints(args.tokens) if args.tokens else CPU_TOKENS if device.type == "cpu"
              else QUICK_TOKENS if args.quick else TOKENS)
    ceil = common.ceilings(device)
    anchor, why = common.load_anchor(ANCHOR, device)
    print(f"device {common.device_name(device)}; copy {ceil['copy_TBps']:.3g} TB/s, "
          f"bf16 {ceil['bf16_TFLOPs']:.3g} TFLOP/s; {why}")
    cpu = device.type == "cpu"
    ctx = {"device": device, "dtype": torch.bfloat16, "ceilings": ceil, "anchor": anchor,
           "budget_ms": 50.0 if cpu else args.budget_ms, "max_iters": 3 if cpu else 50,
           "split_k": common.parse_ints(args.split_k) if args.split_k else (),
           "contexts": kernel_contexts(args.kernel), "impls": tuple(args.impls.split(",")) if args.impls else ()}
    rows = []
    for name, shape in shapes.items():
        weights = make_weights(shape, device, ctx["dtype"], rotation_copies(shape, device, args.max_copies))
        for T in tokens:
            rows.append(measure_row(name, shape, T, weights, ctx))
            print(f"  {name} T={T}: " + ", ".join(f"{k} {v:.4g} ms" for k, v in rows[-1]["best_ms"].items()),
                  flush=True)
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summ = summary(rows)
    payload = {"meta": common.environment(device, "bench_fused_moe", ceil), "anchor": why,
               "settings": {"dtype": "bf16", "tokens": tokens, "shapes": {n: asdict(s) for n, s in shapes.items()},
                            "budget_ms": ctx["budget_ms"], "split_k": ctx["split_k"],
                            "kernel": args.kernel or "heuristic"},
               "rows": rows, "summary": summ}
    json_path = common.write_json(common.result_path("bench_fused_moe", device, args.out, "json"), payload)
    if not args.no_plot:
        plot(json_path.with_suffix(".png"), rows)
    print_report(rows, summ)
    return payload


if __name__ == "__main__":
    main()
