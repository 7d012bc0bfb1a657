"""FP8 per-tensor fused MoE: jitmoe's e4m3 layer against its own bf16 layer and the FP8 floor, on the DESIGN.md
section 5 shapes.

For each shape and T, in one run: the ceilings (copy bandwidth, bf16 and e4m3 GEMM peaks: torch.matmul and
torch._scaled_mm on 8192^3), the FP8 floor (activated experts' e4m3 weights read once + the e4m3 input and bf16
output at copy BW, or 6*T*k*H*I FLOPs at the e4m3 peak, whichever is larger), and CUDA-event medians of
cutlass_fused_moe in bf16 and in FP8 (weights rotated among copies, or the L2 flushed), with each one's relative
error against the fp32 layer of the unquantized weights. No peer runs FP8 MoE on this machine, so there is no
peer column.

With ``--paths`` each row also times the FP8 layer forced onto the decode path and onto the grouped sm90ws GEMMs
(where the heuristic's switch between them should sit).

    python benchmarks/bench_fused_moe_fp8.py [--shapes mixtral,qwen3] [--tokens 16,4096] [--paths] [--out DIR]
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import _common as common
import bench_fused_moe as bf

TOKENS = (16, 256, 1024, 4096, 16384)


def fp8_peak_tflops(device: torch.device, n: int = 8192) -> float:
    """torch._scaled_mm on n^3 e4m3 operands (per-tensor scales, bf16 out), median of CUDA events."""
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    ms = common.time_fn(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), device, warmup=10,
                        iters=30)["median_ms"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _act_amax(x: torch.Tensor, w13: torch.Tensor, inter: int) -> float:
    h = x.float() @ w13.float().t()
    return (torch.nn.functional.silu(h[:, inter:]) * h[:, :inter]).abs().amax().item()


def quantized_sets(shape, T: int, weights: list, device) -> tuple[list, list, torch.Tensor]:
    """(bf16 sets, FP8 sets, fp32 reference of set 0): the same routing and weights, FP8 quantized per expert."""
    quant = common.jitmoe_attr("quant")
    bf16_sets, fp8_sets = [], []
    for w13, w2 in weights:
        x, ids, scales = bf.make_routing(shape, T, device, torch.bfloat16)
        (xq, xs), (w13q, s1), (w2q, s2) = quant.quantize_fp8(x), quant.quantize_fp8_per_expert(w13), \
            quant.quantize_fp8_per_expert(w2)
        # act2 scale as a calibration would give it: the amax of SiLU(gate) * up on a sample of rows and experts,
        # with 25% headroom.
        amax = max(_act_amax(x[:256], w13[e], shape.I) for e in range(min(4, shape.E)))
        qs = quant.fp8_quant_scales(s1, s2, xs, torch.tensor(1.25 * amax / quant.FP8_MAX, device=device))
        bf16_sets.append((x, ids, scales, w13, w2))
        fp8_sets.append((xq, ids, scales, w13q, w2q, qs))
    ref = bf.torch_loop_moe(*bf16_sets[0], compute_dtype=torch.float32)
    return bf16_sets, fp8_sets, ref


@dataclass(frozen=True)
class QuantMode:
    """One quantized form of the layer, as the shared row/report/main code below measures it."""

    label: str                # 'fp8' | 'int8': row keys jitmoe_<label>, <label>_floor_ms, ...
    make_sets: Callable       # (shape, T, weights, device) -> (bf16 sets, quantized sets, fp32 reference)
    input_bytes: int          # the quantized layer's input element (the output is bf16)
    peak_key: str             # ctx key of the TFLOP/s ceiling its floor uses
    paths: tuple[str, ...]    # forced paths for --paths
    extra: dict | None = None  # cutlass_fused_moe kwargs of the quantized calls


FP8_MODE = QuantMode("fp8", quantized_sets, 1, "fp8_TFLOPs", ("decode", "sm90ws"))


def measure_row(name, shape, T: int, weights: list, ctx: dict) -> dict:
    device, mode = ctx["device"], ctx["mode"]
    label = mode.label
    bf16_sets, q_sets, ref = mode.make_sets(shape, T, weights, device)
    distinct = sum(s[1].unique().numel() for s in bf16_sets) / len(bf16_sets)
    nbytes = distinct * 3 * shape.H * shape.I + T * shape.H * (mode.input_bytes + 2)  # 1-byte weights
    floor, bound = common.floor_ms(nbytes, bf.moe_flops(T, shape.k, shape.H, shape.I),
                                   {"copy_TBps": ctx["ceilings"]["copy_TBps"], "bf16_TFLOPs": ctx[mode.peak_key]})
    out = torch.empty(T, shape.H, device=device, dtype=torch.bfloat16)
    impls = {"jitmoe_bf16": (bf.jitmoe_moe(out), bf16_sets), f"jitmoe_{label}": (bf.jitmoe_moe(out, mode.extra),
                                                                                  q_sets)}
    for path in ctx["paths"]:
        impls[f"jitmoe_{label}_{path}"] = (bf.jitmoe_moe(out, mode.extra, bf.kernel_contexts(path)), q_sets)
    row = {"shape": name, **asdict(shape), "T": T, "copies": len(weights), "distinct_experts": distinct,
           f"{label}_floor_ms": floor, "bound": bound, "impls": {}}
    for impl, (fn, sets) in impls.items():
        row["impls"][impl] = bf.time_moe(fn, sets, ctx, graph=T <= bf.GRAPH_MAX_T, ref=ref)
    times = {impl: bf.best_ms(r) for impl, r in row["impls"].items()}
    row["best_ms"] = times
    if times[f"jitmoe_{label}"]:
        row[f"{label}_floor_frac"] = floor / times[f"jitmoe_{label}"]
        row[f"{label}_speedup_vs_bf16"] = (times["jitmoe_bf16"] / times[f"jitmoe_{label}"] if times["jitmoe_bf16"]
                                           else None)
    return row


def print_report(rows: list[dict], paths: tuple, label: str) -> None:
    if paths:
        print(common.markdown_table(("shape", "T", f"{label} (heuristic) ms", *(f"{label} {p} ms" for p in paths)),
                                    [(r["shape"], r["T"], f"{r['best_ms'][f'jitmoe_{label}']:.4g}",
                                      *(f"{r['best_ms'].get(f'jitmoe_{label}_{p}') or 0:.4g}" for p in paths))
                                     for r in rows]))
    print(common.markdown_table(
        ("shape", "T", "bound", f"{label} floor", "bf16 ms", f"{label} ms", f"{label} floor/time",
         f"{label} vs bf16", "bf16 err", f"{label} err"),
        [(r["shape"], r["T"], r["bound"], f"{r[f'{label}_floor_ms']:.4g}", f"{r['best_ms']['jitmoe_bf16']:.4g}",
          f"{r['best_ms'][f'jitmoe_{label}']:.4g}", f"{r.get(f'{label}_floor_frac', 0):.3f}",
          f"{r.get(f'{label}_speedup_vs_bf16') or 0:.2f}x", f"{r['impls']['jitmoe_bf16'].get('err', 0):.2e}",
          f"{r['impls'][f'jitmoe_{label}'].get('err', 0):.2e}") for r in rows]))


def main(argv=None, mode: QuantMode = FP8_MODE, doc: str = __doc__) -> dict:
    label = mode.label
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--shapes", default=None, help="comma list (default: the DESIGN.md grid)")
    parser.add_argument("--tokens", default=None, help=f"comma list (default {TOKENS})")
    parser.add_argument("--budget-ms", type=float, default=300.0, help="timed time per implementation and row")
    parser.add_argument("--max-copies", type=int, default=4)
    parser.add_argument("--paths", action="store_true",
                        help=f"also time {label} forced onto {' and '.join(mode.paths)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = common.pick_device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ceil = common.ceilings(device)
    ctx = {"device": device, "ceilings": ceil, "bf16_TFLOPs": ceil["bf16_TFLOPs"], "budget_ms": args.budget_ms,
           "max_iters": 50, "paths": mode.paths if args.paths else (), "mode": mode}
    if mode.peak_key == "fp8_TFLOPs":
        ctx["fp8_TFLOPs"] = fp8_peak_tflops(device)
    print(f"device {common.device_name(device)}; copy {ceil['copy_TBps']:.3g} TB/s, bf16 {ceil['bf16_TFLOPs']:.3g}"
          f" TFLOP/s" + (f", e4m3 {ctx['fp8_TFLOPs']:.3g} TFLOP/s" if "fp8_TFLOPs" in ctx else ""))
    shapes = bf.resolve_shapes(args.shapes, device)
    tokens = common.parse_ints(args.tokens) if args.tokens else TOKENS
    rows = []
    for name, shape in shapes.items():
        weights = bf.make_weights(shape, device, torch.bfloat16, bf.rotation_copies(shape, device, args.max_copies))
        for T in tokens:
            rows.append(measure_row(name, shape, T, weights, ctx))
            print(f"  {name} T={T}: " + ", ".join(f"{k} {v:.4g} ms" for k, v in rows[-1]["best_ms"].items()),
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    bench = f"bench_fused_moe_{label}"
    payload = {"meta": {**common.environment(device, bench, ceil), mode.peak_key: ctx[mode.peak_key]},
               "settings": {"tokens": tokens, "shapes": {n: asdict(s) for n, s in shapes.items()},
                            "budget_ms": args.budget_ms, "paths": ctx["paths"]},
               "rows": rows, "summary": {f"geomean_{label}_floor_frac": common.geomean(
                   r.get(f"{label}_floor_frac") for r in rows), f"geomean_{label}_speedup_vs_bf16": common.geomean(
                   r.get(f"{label}_speedup_vs_bf16") for r in rows)}}
    common.write_json(common.result_path(bench, device, args.out, "json"), payload)
    print_report(rows, ctx["paths"], label)
    summary = payload["summary"]
    print(f"geomean {label} floor/time {summary[f'geomean_{label}_floor_frac']:.4f}, {label} speedup over bf16 "
          f"{summary[f'geomean_{label}_speedup_vs_bf16']:.3f}x")
    return payload


if __name__ == "__main__":
    main()
