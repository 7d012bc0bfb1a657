"""Build, in parallel, the bf16 sm_90a modules the fused-MoE benchmark uses (SwiGLU / identity sm90ws GEMMs, the
decode path, routing and permute), not every activation that `jitmoe prewarm` builds."""
import re, sys, time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from types import SimpleNamespace
from jitmoe import cli

args = SimpleNamespace(op="fused_moe,fused_moe_decode,moe_align", dtype="bf16", topk="", arch="90a")
keep = re.compile(sys.argv[1] if len(sys.argv) > 1 else r"Swiglu_|Identity|^(?!moe_gemm|moe_decode)")
specs = [s for s in cli._prewarm_specs(args) if keep.search(s.readable_name) and "moe_gemm_sm80" not in s.readable_name
         and "moe_gemm_sm90_" not in s.readable_name]
t0 = time.time()
with ProcessPoolExecutor(max_workers=8, mp_context=get_context("spawn")) as pool:
    futs = {pool.submit(cli._build_one, s.to_dict(), 2): s for s in specs}
    for f in as_completed(futs):
        print(futs[f].readable_name, f.result(), f"{time.time() - t0:.0f} s", flush=True)
