"""jitmoe.autotune on the GPU: a tuned call matches the fp32 reference, its choice is stored and reused outside the
context (the heuristic is disabled to prove it), captures into a CUDA graph, round-trips through autotune(cache=...),
and every candidate config it may pick computes the reference. Candidates are restricted to one kernel family (sm90
on an H100, else sm80): about 4-6 modules beyond the defaults (`jitmoe prewarm --op fused_moe_autotune` builds them).
"""
import math

import pytest
import torch

import jitmoe
from jitmoe.jit.tuning import TuningStore
from jitmoe.ops import fused_moe as fm
from jitmoe.ops import moe_autotune as at
from jitmoe.ops import moe_gemm
from jitmoe.reference.moe import fused_moe_reference
from jitmoe.testing import capture_graph, poison_, rel_error

pytestmark = pytest.mark.gpu
TOL = 1e-2
BF16 = torch.bfloat16
E, H, I, K, T = 8, 256, 512, 2, 64


def _kernels():
    if not torch.cuda.is_available():
        return ("sm80",)
    kernels = moe_gemm.kernels_for_arch(fm._device_arch(torch.cuda.current_device()))
    return ("sm90",) if "sm90" in kernels else ("sm80",)


KERNELS = _kernels()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private, empty store file (the module cache stays where it is: its modules are prewarmed)."""
    monkeypatch.delenv("JITMOE_TUNING", raising=False)
    fresh = TuningStore(at.STORE_NAME, tmp_path / "store.json")
    monkeypatch.setattr(at, "_STORE", fresh)
    monkeypatch.setattr(at, "_DECODED", {})
    monkeypatch.setattr(at, "_FAILED", set())
    return fresh


def make_problem(num_tokens=T):
    dev = "cuda"
    x = torch.randn(num_tokens, H, device=dev).to(BF16)
    ids = torch.rand(num_tokens, E, device=dev).argsort(dim=1)[:, :K].int().contiguous()
    scales = torch.softmax(torch.randn(num_tokens, K, device=dev), dim=-1)
    fc1 = torch.randn(E, 2 * I, H, device=dev, dtype=BF16).mul_(1 / math.sqrt(H))
    fc2 = torch.randn(E, H, I, device=dev, dtype=BF16).mul_(1 / math.sqrt(I))
    return dict(x=x, ids=ids, scales=scales, fc1=fc1, fc2=fc2)


def run(p, output=None):
    output = poison_(torch.empty_like(p["x"])) if output is None else output
    jitmoe.cutlass_fused_moe(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], BF16, None, output=output)
    return output


def reference(p):
    return fused_moe_reference(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], out_dtype=torch.float32)


def key_of(p):
    index = p["x"].device.index
    return at.problem_key(arch=fm._device_arch(index), num_sms=fm._device_sms(index), dtype=BF16, gated=True,
                          hidden=H, inter=I, num_local_experts=E, topk=K, num_tokens=p["x"].shape[0])


def forbid_heuristic(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the heuristic ran although a stored choice exists")
    monkeypatch.setattr(fm._gemm, "select_config", boom)


def tune(p, **kw):
    with at.options(kernels=KERNELS), jitmoe.autotune(**kw):
        return run(p)


def test_tuned_call_matches_reference_and_is_reused(store, monkeypatch):
    p = make_problem()
    tuned = tune(p)
    assert rel_error(tuned, reference(p)) <= TOL
    key = key_of(p)
    choice = at.lookup(key)
    assert choice is not None and choice[0].kernel in KERNELS and choice[0].block_m == choice[1].block_m
    assert key.text in TuningStore(at.STORE_NAME, store.path).snapshot()  # on disk
    forbid_heuristic(monkeypatch)
    again = run(p)
    assert torch.equal(again, tuned)  # the same configs: deterministic, bitwise equal
    q = make_problem(num_tokens=T - 7)  # same bucket, other inputs
    assert rel_error(run(q), reference(q)) <= TOL


def test_tuned_call_captures_and_replays(store, monkeypatch):
    p = make_problem()
    tune(p)
    forbid_heuristic(monkeypatch)
    out = torch.empty_like(p["x"])
    graph = capture_graph(lambda: run(p, out))
    for _ in range(2):
        fresh = make_problem()
        for name in ("x", "ids", "scales", "fc1", "fc2"):
            p[name].copy_(fresh[name])
        poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, reference(fresh)) <= TOL


def test_capture_inside_autotune_never_tunes(store):
    p = make_problem(num_tokens=33)
    run(p)  # heuristic, outside the context: loads its modules before capture

    def no_timing(run_candidate, candidate):
        raise AssertionError(f"tuned {candidate} during capture")
    out = torch.empty_like(p["x"])
    graph = torch.cuda.CUDAGraph()
    with at.options(timer=no_timing), jitmoe.autotune():
        with torch.cuda.graph(graph):
            run(p, out)
    assert at.lookup(key_of(p)) is None and not store.snapshot()
    poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out, reference(p)) <= TOL


def test_cache_file_round_trip(store, monkeypatch, tmp_path):
    p = make_problem()
    path = tmp_path / "flashinfer_style.json"
    tune(p, cache=str(path))
    choice = at.lookup(key_of(p))
    loaded = TuningStore("elsewhere", tmp_path / "other.json")
    assert loaded.load_file(path) >= 1 and loaded.get(key_of(p).text) == store.get(key_of(p).text)
    # a new process with an empty store: the file's choice applies
    monkeypatch.setattr(at, "_STORE", TuningStore(at.STORE_NAME, tmp_path / "empty.json"))
    monkeypatch.setattr(at, "_DECODED", {})
    forbid_heuristic(monkeypatch)
    with jitmoe.autotune(False, cache=path):
        assert at.lookup(key_of(p)) == choice
        assert rel_error(run(p), reference(p)) <= TOL


def _pairs(groups):
    """Every candidate of each GEMM at least once, paired with the group's first candidate of the other GEMM."""
    for g in groups:
        yield from ((c1, g.gemm2[0]) for c1 in g.gemm1)
        yield from ((g.gemm1[0], c2) for c2 in g.gemm2[1:])


def test_every_candidate_computes_the_reference(store, monkeypatch):
    p = make_problem()
    key = key_of(p)
    ref = reference(p)
    forbid_heuristic(monkeypatch)
    pairs = list(_pairs(at.candidate_groups(key, kernels=KERNELS)))
    assert len(pairs) >= 4 and any(c2.k_splits > 1 for _, c2 in pairs)
    for cfg1, cfg2 in pairs:
        store.put(key.text, at.encode(at.Choice(cfg1, cfg2, 1.0, 1.0)))
        assert at.lookup(key) == (cfg1, cfg2)
        assert rel_error(run(p), ref) <= TOL, (cfg1, cfg2)
