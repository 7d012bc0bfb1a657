"""EC paths vs top-k softmax: L2-flushed CUDA-event medians per path, outputs compared across paths, and a kernel
breakdown of the key path from the torch profiler."""
import sys
import torch
import jitmoe
from jitmoe.ops import expert_choice as ops
from jitmoe.testing import bench_events

SHAPES = [(16384, 256, 8, torch.bfloat16), (16384, 256, 8, torch.float32), (65536, 256, 8, torch.bfloat16),
          (4096, 256, 8, torch.bfloat16), (2048, 256, 8, torch.bfloat16), (16384, 64, 8, torch.bfloat16),
          (16384, 1024, 8, torch.bfloat16), (4096, 1024, 8, torch.bfloat16), (32768, 160, 6, torch.bfloat16),
          (16384, 512, 32, torch.bfloat16), (8192, 128, 2, torch.bfloat16), (1024, 256, 8, torch.bfloat16),
          (1024, 1024, 8, torch.bfloat16), (256, 64, 8, torch.bfloat16), (64, 256, 8, torch.bfloat16),
          (32768, 256, 8, torch.bfloat16)]
PATHS = ["columns", "candidates", "keys", "auto"]


def run_path(x, k, cap, path, expert_major, outputs):
    ops.launch_expert_choice(x, None, k, cap, "experts", "topk", expert_major, outputs, path)
    return outputs


def main():
    for T, E, k, dtype in SHAPES:
        torch.manual_seed(T + E)
        xs = [torch.randn(T, E, device="cuda", dtype=dtype) for _ in range(4)]
        cap = jitmoe.expert_choice_capacity(T, E, k, 1.25)
        cur = {"x": xs[0]}
        setup = lambda i: cur.__setitem__("x", xs[i % 4])
        tk = bench_events(lambda: jitmoe.topk_softmax(cur["x"], k), setup=setup, iters=40)["median_ms"] * 1e3
        line = f"T={T:6d} E={E:5d} k={k:2d} {str(dtype)[6:]:9s} topk {tk:7.1f} |"
        for em in (False, True):
            outs = ops.new_outputs(xs[0], k, cap, em)
            base = None
            for path in PATHS:
                try:
                    got = [t.clone() for t in run_path(xs[0], k, cap, path, em, outs)]
                except Exception as err:  # noqa
                    line += f" {path}: {type(err).__name__}"
                    continue
                if base is None:
                    base = got
                same = all(torch.equal(a, b) for a, b in zip(got, base))
                us = bench_events(lambda: run_path(cur["x"], k, cap, path, em, outs), setup=setup,
                                  iters=40)["median_ms"] * 1e3
                line += f" {'EM' if em else 'TM'}-{path[:4]} {us:6.1f}{'' if same else ' DIFF'}"
            if not em:
                # the public API (what bench_routers times)
                us = bench_events(lambda: jitmoe.expert_choice(cur["x"], k, 1.25), setup=setup, iters=40)["median_ms"] * 1e3
                line += f" api {us:6.1f} (x{us / tk:4.2f}) |"
        print(line, flush=True)
    T, E, k = 16384, 256, 8
    x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        jitmoe.expert_choice(x, k, 1.25)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            jitmoe.expert_choice(x, k, 1.25)
            jitmoe.expert_choice(x, k, 1.25, expert_major=True)
            jitmoe.topk_softmax(x, k)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
