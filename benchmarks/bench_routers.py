"""Router benchmark (issues 3 and 4): each jitmoe router against its torch composite, plus the Omni router.

Routers (top-k softmax, top-k sigmoid, DeepSeek-V3 grouped top-k, Expert Choice) run over T x E on random logits and
report achieved GB/s over the logits read, the floor (logits read + outputs written at the measured copy bandwidth)
and the speedup over the composite. The Omni router runs forward and forward+backward against the brute-force torch
path (materialise N^2 sums + topk) and the torch candidate method (2x topk + k^2 grid + topk), next to the recorded
public Triton router (anchor JSON, same GPU model). Ends with the issue targets, PASS/MISS.

    python benchmarks/bench_routers.py [--quick] [--device cpu] [--out DIR] [--only topk_softmax,omni]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

import _common as common
from jitmoe.testing import rel_error

TOPK = 8
GROUPED = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}  # DeepSeek-V3's routing
CAPACITY_FACTOR = 1.25
BRUTE_LIMIT_BYTES = 4 << 30  # the brute-force Omni path materialises T x N^2 scores: skip it above this
OMNI_ANCHOR = "h100-2026-11-22-omni-router.json"

GRIDS = {
    "full": {"T": (1, 64, 1024, 16384, 65536), "E": (64, 256, 1024), "omni_T": (1024, 16384),
             "omni_NK": ((64, 16), (128, 16), (256, 32), (1024, 64))},
    "quick": {"T": (1, 1024, 16384, 65536), "E": (256,), "omni_T": (16384,), "omni_NK": ((256, 32),)},
    "cpu": {"T": (1, 33), "E": (16,), "omni_T": (8,), "omni_NK": ((4, 3),)},
}


# ----------------------------------------------------------------------------------------------- torch composites

def torch_topk_softmax(logits: torch.Tensor, k: int):
    weights, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return weights, ids.to(torch.int32)


def torch_topk_sigmoid(logits: torch.Tensor, k: int):
    weights, ids = torch.sigmoid(logits.float()).topk(k, dim=-1)
    return weights, ids.to(torch.int32)


def torch_grouped_topk(logits: torch.Tensor, k: int, bias: torch.Tensor, n_group: int, topk_group: int,
                       routed_scaling_factor: float):
    """DeepSeek-V3 noaux_tc in torch: sigmoid scores, bias for selection only, group score = sum of top-2."""
    T, E = logits.shape
    scores = torch.sigmoid(logits.float())
    choice = scores + bias
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)
    kept_groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, kept_groups, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    ids = choice.masked_fill(expert_mask == 0, float("-inf")).topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(dim=-1, keepdim=True) * routed_scaling_factor
    return weights, ids.to(torch.int32)


def torch_expert_choice(logits: torch.Tensor, k: int, capacity_factor: float):
    """The SGLang-fork EC algorithm (routers.md B.1): dense (T, E) assignment, token top-k, top-k fallback."""
    T, E = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)
    capacity = min(max(int(T * k / E * capacity_factor), k), T)
    picked_scores, picked_tokens = scores.t().topk(capacity, dim=-1)  # [E, C]
    assignment = torch.zeros(E, T, dtype=scores.dtype, device=scores.device)
    assignment = assignment.scatter_(1, picked_tokens, picked_scores).t()  # [T, E]
    weights, ids = assignment.topk(k, dim=-1)
    fallback_w, fallback_ids = scores.masked_fill(assignment > 0, float("-inf")).topk(k, dim=-1)
    empty = weights == 0
    return torch.where(empty, fallback_w, weights), torch.where(empty, fallback_ids, ids).to(torch.int32)


def torch_omni_brute(x: torch.Tensor, y: torch.Tensor, k: int):
    """All N^2 sums materialised in the input dtype, then one topk (the anchor's brute-force path)."""
    T, N = x.shape
    scores, flat = (x.unsqueeze(2) + y.unsqueeze(1)).view(T, N * N).topk(k, dim=-1)
    return scores, flat.to(torch.int32)


def torch_omni_candidates(x: torch.Tensor, y: torch.Tensor, k: int):
    """The candidate method in torch: top-kc of each axis, the kc x kc grid of sums, top-k of the grid."""
    T, N = x.shape
    kc = min(N, k)
    xv, xi = x.topk(kc, dim=-1)
    yv, yi = y.topk(kc, dim=-1)
    scores, cell = (xv.unsqueeze(2) + yv.unsqueeze(1)).view(T, kc * kc).topk(k, dim=-1)
    ix, iy = xi.gather(1, cell // kc), yi.gather(1, cell % kc)
    return scores, (ix * N + iy).to(torch.int32)


# ----------------------------------------------------------------------------------------------- bytes and floors

def router_bytes(T: int, E: int, k: int, logits_dtype: torch.dtype) -> dict:
    """Logits read once; fp32 weights + int32 ids written once."""
    return {"logits": T * E * logits_dtype.itemsize, "outputs": T * k * (4 + 4)}


def omni_bytes(T: int, N: int, k: int, dtype: torch.dtype) -> dict:
    """Forward: x and y read, scores (input dtype) + int32 indices written. Backward: dscores + indices read,
    dx and dy written."""
    s = dtype.itemsize
    forward = 2 * T * N * s + T * k * (s + 4)
    return {"fwd": forward, "fwdbwd": forward + T * k * (s + 4) + 2 * T * N * s}


# ----------------------------------------------------------------------------------------------- cases and timing

@dataclass
class RouterCase:
    name: str
    dtype: torch.dtype
    jit: Callable  # (op, logits, bias, k) -> (weights, ids)
    composite: Callable  # (logits, bias, k) -> (weights, ids)
    comparable: bool  # same selection rule as the composite, so sorted weights must agree

    @property
    def label(self) -> str:
        return f"{self.name} {common.dtype_name(self.dtype)}"


ROUTER_CASES = (
    RouterCase("topk_softmax", torch.float32, lambda op, x, b, k: op(x, k),
               lambda x, b, k: torch_topk_softmax(x, k), True),
    RouterCase("topk_softmax", torch.bfloat16, lambda op, x, b, k: op(x, k),
               lambda x, b, k: torch_topk_softmax(x, k), True),
    RouterCase("topk_sigmoid", torch.bfloat16, lambda op, x, b, k: op(x, k),
               lambda x, b, k: torch_topk_sigmoid(x, k), True),
    RouterCase("grouped_topk", torch.bfloat16,
               lambda op, x, b, k: op(x, k, GROUPED["n_group"], GROUPED["topk_group"], renormalize=True,
                                      scoring_func="sigmoid", e_score_correction_bias=b,
                                      routed_scaling_factor=GROUPED["routed_scaling_factor"]),
               lambda x, b, k: torch_grouped_topk(x, k, b, **GROUPED), True),
    RouterCase("expert_choice", torch.bfloat16, lambda op, x, b, k: op(x, k, capacity_factor=CAPACITY_FACTOR),
               lambda x, b, k: torch_expert_choice(x, k, CAPACITY_FACTOR), False),
)


def time_impl(fn: Callable, device: torch.device, timing: dict, graph: bool) -> dict:
    """Median ms of ``fn`` (first call outside the timing: JIT load and errors surface there), plus graph replay."""
    try:
        fn()
    except Exception as err:  # a failing implementation is a row note, not the end of the run
        return {"error": f"{type(err).__name__}: {err}"}
    result = {"ms": common.time_fn(fn, device, **timing)["median_ms"]}
    if graph and device.type == "cuda":
        try:
            result["graph_ms"] = common.time_graphs([fn], iters=timing["iters"])["median_ms"]
        except Exception as err:
            result["graph_error"] = f"{type(err).__name__}: {err}"
    return result


def sorted_weights_error(a, b) -> float:
    """Relative error of the per-row weights sorted descending: independent of the tie order of the ids."""
    return rel_error(a[0].float().sort(dim=-1, descending=True).values,
                     b[0].float().sort(dim=-1, descending=True).values)


def measure_router(case: RouterCase, T: int, E: int, k: int, ctx: dict) -> dict:
    device, ceil = ctx["device"], ctx["ceilings"]
    logits = torch.randn(T, E, device=device, dtype=case.dtype)
    bias = 0.1 * torch.randn(E, device=device)
    nbytes = router_bytes(T, E, k, case.dtype)
    row = {"router": case.name, "dtype": common.dtype_name(case.dtype), "T": T, "E": E, "k": k,
           "logits_bytes": nbytes["logits"],
           "floor_ms": common.floor_ms(nbytes["logits"] + nbytes["outputs"], 0, ceil)[0]}
    impls = {"torch": lambda: case.composite(logits, bias, k)}
    op = common.jitmoe_attr(case.name)
    if op is None:
        row["note"] = f"jitmoe.{case.name} not available yet: skipped"
    else:
        impls["jitmoe"] = lambda: case.jit(op, logits, bias, k)
    for name, fn in impls.items():
        res = time_impl(fn, device, ctx["timing"], graph=T <= 64)
        row.update({f"{name}_{key}": value for key, value in res.items()})
        if "ms" in res:
            row[f"{name}_GBps"] = nbytes["logits"] / (res["ms"] * 1e-3) / 1e9
    if row.get("jitmoe_ms") and row.get("torch_ms"):
        row["speedup"] = row["torch_ms"] / row["jitmoe_ms"]
        row["copy_frac"] = row["jitmoe_GBps"] / (ceil["copy_TBps"] * 1e3)
        if case.comparable:
            row["weights_rel_err"] = sorted_weights_error(impls["jitmoe"](), impls["torch"]())
    return row


def omni_impls(T: int, N: int, k: int) -> dict:
    impls = {"torch_candidates": torch_omni_candidates}
    if T * N * N * 2 <= BRUTE_LIMIT_BYTES:
        impls["torch_brute"] = torch_omni_brute
    op = common.jitmoe_attr("omni_router")
    if op is not None:
        impls["jitmoe"] = op
    return impls


def measure_omni(T: int, N: int, k: int, ctx: dict) -> dict:
    device, dtype = ctx["device"], torch.bfloat16
    x = torch.randn(T, N, device=device, dtype=dtype)
    y = torch.randn(T, N, device=device, dtype=dtype)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    dscores = torch.randn(T, k, device=device, dtype=dtype)
    nbytes = omni_bytes(T, N, k, dtype)
    row = {"T": T, "N": N, "k": k, "dtype": "bf16",
           "floor_fwd_ms": common.floor_ms(nbytes["fwd"], 0, ctx["ceilings"])[0],
           "floor_fwdbwd_ms": common.floor_ms(nbytes["fwdbwd"], 0, ctx["ceilings"])[0]}
    impls = omni_impls(T, N, k)
    if "jitmoe" not in impls:
        row["note"] = "jitmoe.omni_router not available yet: skipped"
    if "torch_brute" not in impls:
        row["brute_note"] = f"skipped: T*N^2 scores = {T * N * N * 2 / 2**30:.1f} GiB"
    for name, fn in impls.items():
        def backward_step(fn=fn):
            scores, _ = fn(xg, yg, k)
            torch.autograd.grad(scores, (xg, yg), dscores)
        for phase, step in (("fwd", lambda fn=fn: fn(x, y, k)), ("fwdbwd", backward_step)):
            # Our op also runs captured in a CUDA graph: that number is the kernels without the host's
            # Python/autograd dispatch, which an eager call of a ~50 us op cannot hide.
            res = time_impl(step, device, ctx["timing"], graph=name == "jitmoe")
            row.update({f"{name}_{phase}_{key}": value for key, value in res.items()})
    if "jitmoe" in impls and "jitmoe_fwd_ms" in row:
        reference = torch_omni_candidates(x.float(), y.float(), k)
        row["scores_rel_err"] = sorted_weights_error(impls["jitmoe"](x, y, k), reference)
    add_omni_anchor(row, ctx.get("omni_anchor"))
    return row


def add_omni_anchor(row: dict, anchor: dict | None) -> None:
    """Recorded public-router numbers for this (T, N, k) and the speedups over them."""
    if anchor is None:
        return
    match = [r for r in anchor["rows"] if (r["T"], r["N"], r["K"]) == (row["T"], row["N"], row["k"])]
    if not match:
        return
    for key in ("peer_fwd_ms", "peer_fwdbwd_ms", "cand_fwd_ms", "cand_fwdbwd_ms", "brute_fwd_ms"):
        if key in match[0]:
            row[f"recorded_{key}"] = match[0][key]
    for phase in ("fwd", "fwdbwd"):
        peer = row.get(f"recorded_peer_{phase}_ms")
        for timing, suffix in (("ms", ""), ("graph_ms", "_graph")):
            ours = row.get(f"jitmoe_{phase}_{timing}")
            if ours and peer:
                row[f"speedup_vs_peer_{phase}{suffix}"] = peer / ours


# ----------------------------------------------------------------------------------------------- targets, report

def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(key) == value for key, value in match.items())), None)


def router_targets(rows: list[dict]) -> list[tuple]:
    out = []
    big = find(rows, router="topk_softmax", dtype="float32", T=65536, E=256)
    frac = big and big.get("copy_frac")
    out.append(("topk_softmax fp32 T=65536 E=256: logits GB/s / copy BW", frac, ">= 0.70",
                None if frac is None else frac >= 0.70))
    for case in ROUTER_CASES:
        r = find(rows, router=case.name, dtype=common.dtype_name(case.dtype), T=16384, E=256)
        speedup = r and r.get("speedup")
        out.append((f"{case.label} T=16384 E=256: speedup vs composite", speedup, ">= 5",
                    None if speedup is None else speedup >= 5))
    ec = find(rows, router="expert_choice", dtype="bfloat16", T=16384, E=256)
    tk = find(rows, router="topk_softmax", dtype="bfloat16", T=16384, E=256)
    ratio = ec["jitmoe_ms"] / tk["jitmoe_ms"] if ec and tk and ec.get("jitmoe_ms") and tk.get("jitmoe_ms") else None
    out.append(("expert_choice / topk_softmax time, bf16 T=16384 E=256", ratio, "<= 2",
                None if ratio is None else ratio <= 2))
    return out


def omni_targets(rows: list[dict]) -> list[tuple]:
    """Issue 4's targets on CUDA-graph replay of our op (kernel time; the eager numbers are in the Omni table)."""
    out = []
    head = find(rows, T=16384, N=256, k=32) or {}
    for phase, limit in (("fwd", 0.060), ("fwdbwd", 0.100)):
        ms = head.get(f"jitmoe_{phase}_graph_ms")
        out.append((f"omni T=16384 N=256 k=32 {phase} ms (graph replay)", ms, f"<= {limit}",
                    None if ms is None else ms <= limit))
    for r in (r for r in rows if r["T"] == 16384 and "recorded_peer_fwd_ms" in r):
        for phase in ("fwd", "fwdbwd"):
            s = r.get(f"speedup_vs_peer_{phase}_graph")
            out.append((f"omni T=16384 N={r['N']} k={r['k']} {phase}: speedup vs public router (graph replay)", s,
                        ">= 10", None if s is None else s >= 10))
    return out


def print_report(router_rows: list[dict], omni_rows: list[dict], targets: list[tuple]) -> None:
    if router_rows:
        print("\nRouters (events median; GB/s over the logits read)")
        print(common.markdown_table(
            ["router", "dtype", "T", "E", "floor ms", "jitmoe ms", "torch ms", "jit GB/s", "copy frac", "speedup",
             "note"],
            [(r["router"], r["dtype"], r["T"], r["E"], r["floor_ms"], r.get("jitmoe_ms"), r.get("torch_ms"),
              r.get("jitmoe_GBps"), r.get("copy_frac"), r.get("speedup"),
              r.get("note") or r.get("jitmoe_error") or r.get("torch_error")) for r in router_rows]))
    if omni_rows:
        print("\nOmni router (bf16; ms; jit = eager call, jit graph = CUDA-graph replay of the same call; "
              "recorded = public Triton router from the anchor; x peer uses the graph numbers)")
        print(common.markdown_table(
            ["T", "N", "k", "floor fwd", "jit fwd", "jit graph fwd", "jit fwd+bwd", "jit graph fwd+bwd", "cand fwd",
             "cand fwd+bwd", "brute fwd", "rec. peer fwd", "rec. peer fwd+bwd", "x peer fwd", "x peer fwd+bwd"],
            [(r["T"], r["N"], r["k"], r["floor_fwd_ms"], r.get("jitmoe_fwd_ms"), r.get("jitmoe_fwd_graph_ms"),
              r.get("jitmoe_fwdbwd_ms"), r.get("jitmoe_fwdbwd_graph_ms"), r.get("torch_candidates_fwd_ms"),
              r.get("torch_candidates_fwdbwd_ms"), r.get("torch_brute_fwd_ms"), r.get("recorded_peer_fwd_ms"),
              r.get("recorded_peer_fwdbwd_ms"), r.get("speedup_vs_peer_fwd_graph"),
              r.get("speedup_vs_peer_fwdbwd_graph")) for r in omni_rows]))
    print("\nIssue targets (issues 3 and 4)")
    print(common.markdown_table(["target", "measured", "goal", "verdict"],
                                [(name, value, goal, common.verdict(ok)) for name, value, goal, ok in targets]))


def plot(path, router_rows: list[dict], omni_rows: list[dict], ceil: dict) -> None:
    panels = []
    for case in ROUTER_CASES:
        rows = [r for r in router_rows if r["router"] == case.name and r["dtype"] == common.dtype_name(case.dtype)]
        series = {}
        for E in sorted({r["E"] for r in rows}):
            sel = [r for r in rows if r["E"] == E]
            for impl in ("jitmoe", "torch"):
                series[f"{impl} E={E}"] = ([r["T"] for r in sel], [r.get(f"{impl}_GBps") for r in sel])
        if rows:
            panels.append({"title": case.label, "xlabel": "tokens T", "ylabel": "GB/s (logits read)", "logx": 2,
                           "logy": True, "series": series, "hline": (ceil["copy_TBps"] * 1e3, "copy BW")})
    for phase in ("fwd", "fwdbwd"):
        T = max((r["T"] for r in omni_rows), default=None)
        sel = [r for r in omni_rows if r["T"] == T]
        if not sel:
            continue
        keys = ("jitmoe", "torch_candidates", "torch_brute", "recorded_peer")
        series = {key: ([r["N"] for r in sel], [r.get(f"{key}_{phase}_ms") for r in sel]) for key in keys}
        panels.append({"title": f"omni {phase}, T={T} (k per N as in the grid)", "xlabel": "N (experts = N^2)",
                       "ylabel": "ms", "logx": 2, "logy": True, "series": series})
    if panels:
        common.plot_panels(path, panels, "jitmoe routers vs torch composites")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke subset (E=256, omni at T=16384 N=256 k=32)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (tiny sizes)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", default="topk_softmax,topk_sigmoid,grouped_topk,expert_choice,omni",
                        help="comma-separated subset of the routers")
    parser.add_argument("--topk", type=int, default=TOPK, help="k for the top-k style routers")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    grid = GRIDS["cpu" if device.type == "cpu" else "quick" if args.quick else "full"]
    only = set(args.only.split(","))
    ceil = common.ceilings(device)
    print(f"device {common.device_name(device)}; copy {ceil['copy_TBps']:.3g} TB/s, "
          f"bf16 {ceil['bf16_TFLOPs']:.3g} TFLOP/s")
    anchor, why = common.load_anchor(OMNI_ANCHOR, device)
    print(why)
    timing = {"warmup": 10, "iters": 50} if device.type == "cuda" else {"warmup": 1, "iters": 3}
    ctx = {"device": device, "ceilings": ceil, "timing": timing, "omni_anchor": anchor}
    for name in sorted(only):
        name = "omni_router" if name == "omni" else name
        if common.jitmoe_attr(name) is None:
            print(f"jitmoe.{name} is not available yet: its rows time the torch composite only")
    router_rows = [measure_router(case, T, E, min(args.topk, E), ctx)
                   for case in ROUTER_CASES if case.name in only for E in grid["E"] for T in grid["T"]]
    omni_rows = [measure_omni(T, N, k, ctx) for T in grid["omni_T"] for N, k in grid["omni_NK"]] \
        if "omni" in only else []
    targets = router_targets(router_rows) + omni_targets(omni_rows)
    payload = {"meta": common.environment(device, "bench_routers", ceil), "anchor": why,
               "settings": {"topk": args.topk, "grouped": GROUPED, "capacity_factor": CAPACITY_FACTOR,
                            "timing": timing, "grid": grid},
               "rows": router_rows, "omni_rows": omni_rows,
               "targets": [{"target": n, "measured": v, "goal": g, "verdict": common.verdict(ok)}
                           for n, v, g, ok in targets]}
    json_path = common.write_json(common.result_path("bench_routers", device, args.out, "json"), payload)
    if not args.no_plot:
        plot(json_path.with_suffix(".png"), router_rows, omni_rows, ceil)
    print_report(router_rows, omni_rows, targets)
    return payload


if __name__ == "__main__":
    main()
