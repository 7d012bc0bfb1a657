"""Time the JIT on this machine: the cold build of one module and the warm first call in a fresh process.

Targets (issue 2): cold build of a router module <= 30 s; warm first call (after `import torch`: import jitmoe +
cache hit + first launch) <= 50 ms. Each measurement runs in its own process against a private empty cache. The
package's bytecode is compiled first, as `pip install` leaves it: under PYTHONDONTWRITEBYTECODE (set on the lent
machines) every process would otherwise compile jitmoe's sources again (~35 ms on the H100 machine).
Usage: python benchmarks/time_jit.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What each case runs once the cache is warm; `x` is created and synchronised before the clock starts.
CASES = {
    "topk_softmax_bf16_k8": (
        "x = torch.randn(4096, 256, device='cuda', dtype=torch.bfloat16)",
        "jitmoe.topk_softmax(x, 8)"),
    "fused_moe_bf16_swiglu": (
        "x = torch.randn(64, 1024, device='cuda', dtype=torch.bfloat16); "
        "w1 = torch.randn(8, 2048, 1024, device='cuda', dtype=torch.bfloat16) * 0.03; "
        "w2 = torch.randn(8, 1024, 1024, device='cuda', dtype=torch.bfloat16) * 0.03; "
        "ids = torch.randint(0, 8, (64, 2), device='cuda', dtype=torch.int32); "
        "sc = torch.rand(64, 2, device='cuda')",
        "jitmoe.cutlass_fused_moe(x, ids, sc, w1, w2, torch.bfloat16, None)"),
}

SCRIPT = """
import time, torch
{setup}
torch.cuda.synchronize()
t0 = time.perf_counter()
import jitmoe
t1 = time.perf_counter()
{call}
torch.cuda.synchronize()
t2 = time.perf_counter()
{call}
torch.cuda.synchronize()
t3 = time.perf_counter()
from jitmoe.jit.build import STATS
print('RESULT', (t2 - t0) * 1e3, STATS['built'], STATS['warm'], (t1 - t0) * 1e3, (t3 - t2) * 1e3)
"""


# The warm first call once more under cProfile: where its milliseconds go (host side; the device work is synced).
PROFILE_SCRIPT = """
import cProfile, io, pstats, torch
{setup}
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
import jitmoe
{call}
torch.cuda.synchronize()
prof.disable()
buf = io.StringIO()
pstats.Stats(prof, stream=buf).sort_stats('cumulative').print_stats(30)
print(buf.getvalue())
"""


def profile_warm_call(name: str, env: dict) -> str:
    setup, call = CASES[name]
    proc = subprocess.run([sys.executable, "-c", PROFILE_SCRIPT.format(setup=setup, call=call)], env=env,
                          capture_output=True, text=True, timeout=900)
    return proc.stdout[-12000:] if proc.returncode == 0 else proc.stderr[-2000:]


def run_case(name: str, cache: str) -> dict:
    setup, call = CASES[name]
    env = {**os.environ, "JITMOE_CACHE_DIR": cache, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    for phase in ("cold", "warm", "warm"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup, call=call)], env=env,
                              capture_output=True, text=True, timeout=900)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if proc.returncode != 0 or not line:
            return {"case": name, "error": proc.stderr[-2000:]}
        ms, built, warm, import_ms, second_ms = line[0].split()[1:]
        rows.append({"phase": phase, "ms": float(ms), "built": int(built), "warm": int(warm),
                     "import_ms": float(import_ms), "second_call_ms": float(second_ms)})
    metas = [json.loads(p.read_text()) for p in Path(cache).rglob("meta.json")]
    return {"case": name, "cold_first_call_ms": rows[0]["ms"], "modules_built": rows[0]["built"],
            "build_seconds": {m["spec"]: m["build_seconds"] for m in metas},
            "warm_first_call_ms": min(r["ms"] for r in rows[1:]), "runs": rows,
            "warm_profile": profile_warm_call(name, env)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    import torch
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "jitmoe")], check=True)
    results = {"device": torch.cuda.get_device_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "commit": os.environ.get("BENCH_GIT_COMMIT") or subprocess.run(
                   ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip(),
               "cases": []}
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="jitmoe-timing-") as cache:
            res = run_case(name, cache)
        results["cases"].append(res)
        print(json.dumps(res))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "jit_timing.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
