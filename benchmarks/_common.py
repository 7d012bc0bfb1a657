"""Helpers shared by the benchmark scripts: device, ceilings, timing, provenance, JSON/PNG output, anchors.

Timing on CUDA goes through ``jitmoe.testing`` (device events, warm-up, medians, L2 flush); on the CPU (smoke runs
only) through ``time.perf_counter``. Results land in ``benchmarks/results/`` (or ``--out DIR``) as
``<script>_<device-slug>_<commit7>.{json,png}``. Two environment variables help where the checkout is a bare copy:
BENCH_GIT_COMMIT (the commit when ``git`` cannot tell) and BENCH_ANCHORS_DIR (folder of the anchor JSONs).
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

try:  # a plain checkout works without `pip install -e .`
    import jitmoe  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO_ROOT))
    import jitmoe  # noqa: F401

from jitmoe.testing import bench_events, capture_graph, measure_ceilings, summarize  # noqa: E402


# ----------------------------------------------------------------------------------------------- device, provenance

def pick_device(name: str | None) -> torch.device:
    """The device named on the command line, else CUDA when present, else the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; the CPU is 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "unknown"


def git_state() -> dict:
    """{'commit': full sha, 'dirty': bool or None} of the checkout. BENCH_GIT_COMMIT, when set, names the commit and
    wins over git: the device machine runs a copy of the tree whose .git (if any) may be stale."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return {"commit": os.environ["BENCH_GIT_COMMIT"], "dirty": None}
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device, script: str, ceilings: dict | None) -> dict:
    """The provenance block every result file starts with."""
    meta = {"script": script, "device": device_name(device), "device_slug": device_slug(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "git": git_state(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "ceilings": ceilings}
    if device.type == "cuda":
        meta["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    return meta


# ----------------------------------------------------------------------------------------------- ceilings, timing

def ceilings(device: torch.device) -> dict:
    """Copy bandwidth (read + write) and bf16 GEMM peak measured now; on the CPU a quick, rough stand-in."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return measure_ceilings(device)
    n = 1 << 26
    src = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    copy = time_cpu(lambda: dst.copy_(src), warmup=1, iters=5)
    a = torch.randn(512, 512)
    mm = time_cpu(lambda: a @ a, warmup=1, iters=5)
    return {"copy_TBps": 2 * n / (copy["median_ms"] * 1e-3) / 1e12,
            "bf16_TFLOPs": 2 * 512**3 / (mm["median_ms"] * 1e-3) / 1e12, "note": "CPU stand-in (fp32 matmul)"}


def floor_ms(nbytes: float, flops: float, ceil: dict) -> tuple[float, str]:
    """max(bytes / copy BW, FLOPs / GEMM peak) in ms, and which term bounds it ('mem' or 'compute')."""
    mem_ms = nbytes / (ceil["copy_TBps"] * 1e12) * 1e3
    compute_ms = flops / (ceil["bf16_TFLOPs"] * 1e12) * 1e3
    return (mem_ms, "mem") if mem_ms >= compute_ms else (compute_ms, "compute")


def expected_distinct(E: int, k: int, T: int) -> float:
    """Expected distinct experts hit by T tokens each routed to k of E experts uniformly at random."""
    return E * (1.0 - (1.0 - k / E) ** T)


def time_cpu(fn: Callable[[], object], *, warmup: int, iters: int,
             setup: Callable[[int], object] | None = None) -> dict:
    """perf_counter timing for the CPU smoke path (same summary keys as the CUDA timers)."""
    for i in range(warmup):
        if setup:
            setup(i)
        fn()
    samples = []
    for i in range(iters):
        if setup:
            setup(i)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 10, iters: int = 50,
            flush_l2: bool = True, setup: Callable[[int], object] | None = None) -> dict:
    """Median-based timing summary (ms): CUDA events (``jitmoe.testing.bench_events``) or perf_counter on the CPU."""
    if device.type == "cuda":
        return bench_events(fn, warmup=warmup, iters=iters, flush_l2=flush_l2, setup=setup)
    return time_cpu(fn, warmup=warmup, iters=iters, setup=setup)


def time_graphs(fns: Sequence[Callable[[], object]], *, warmup: int = 3, iters: int = 50,
                flush_l2: bool = True) -> dict:
    """Replay one captured graph per input set, round-robin (rotation defeats the L2 like bench_events' setup)."""
    graphs = [capture_graph(fn) for fn in fns]
    current = {"g": graphs[0]}

    def select(i: int) -> None:
        current["g"] = graphs[i % len(graphs)]

    return bench_events(lambda: current["g"].replay(), warmup=warmup, iters=iters, flush_l2=flush_l2, setup=select)


def one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one (already warm) call, synchronised: used only to size the iteration count."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def iterations_for(estimate_ms: float, budget_ms: float, low: int = 5, high: int = 50) -> int:
    """How many timed calls fit in ``budget_ms`` (clamped): big rows get fewer iterations."""
    return int(min(high, max(low, budget_ms // max(estimate_ms, 1e-3))))


def geomean(values: Iterable[float]) -> float | None:
    xs = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else None


def jitmoe_attr(path: str):
    """``jitmoe.<path>`` (e.g. 'topk_softmax', 'nn.FusedMoE') or None while that part of the API does not exist."""
    module_name, _, attr = path.rpartition(".")
    full = f"jitmoe.{module_name}" if module_name else "jitmoe"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as err:
        if err.name != full:  # the module exists but is broken: that must not read as "not written yet"
            raise
        return None
    return getattr(module, attr, None)


# ----------------------------------------------------------------------------------------------- anchors

def anchor_dirs() -> list[Path]:
    """Where the recorded anchor JSONs may live: $BENCH_ANCHORS_DIR, the repo, or the shared folder beside it."""
    dirs = [Path(os.environ["BENCH_ANCHORS_DIR"])] if os.environ.get("BENCH_ANCHORS_DIR") else []
    return dirs + [REPO_ROOT / "shared" / "anchors", REPO_ROOT / "benchmarks" / "anchors",
                   REPO_ROOT.parent / "shared" / "anchors"]


def load_anchor(file_name: str, device: torch.device) -> tuple[dict | None, str]:
    """The anchor JSON when it exists and was recorded on this GPU model, else (None, why)."""
    for directory in anchor_dirs():
        path = directory / file_name
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("device") != device_name(device):
                return None, f"anchor {file_name} was recorded on {data.get('device')!r}, not {device_name(device)!r}"
            return data, f"anchor {path}"
    return None, f"anchor {file_name} not found in {[str(d) for d in anchor_dirs()]} (set BENCH_ANCHORS_DIR)"


# ----------------------------------------------------------------------------------------------- output

def result_path(script: str, device: torch.device, out_dir: str | Path | None, ext: str) -> Path:
    commit = git_state()["commit"]
    directory = Path(out_dir) if out_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{script}_{device_slug(device)}_{commit[:7]}.{ext}"


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


def plot_panels(path: Path, panels: list[dict], title: str) -> Path | None:
    """One PNG of line panels. Each panel: title, xlabel, ylabel, series {label: (xs, ys)}, optional logx (base),
    logy, hline (y, label). matplotlib is the optional `bench` extra: without it, say so and return None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'jitmoe[bench]'): skipped {path.name}")
        return None
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, (xs, ys) in panel["series"].items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if panel.get("hline"):
            ax.axhline(panel["hline"][0], color="gray", linestyle="--", label=panel["hline"][1])
        if panel.get("logx"):
            ax.set_xscale("log", base=panel["logx"])
            ticks = sorted({x for xs, _ in panel["series"].values() for x in xs})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
