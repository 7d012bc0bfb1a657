"""moe_autotune on the CPU: key bucketing, the candidate space, the choice (fake timer, CPU tensors through the CUDA
pipeline's plumbing), persistence, the bypasses (forced kernel/split, capture, JITMOE_TUNING=0) and autotune()'s
arguments. Nothing here builds a module: a real tune would build each new candidate config (20-30 s each)."""
import dataclasses
import json
import math
import warnings

import pytest
import torch

import jitmoe
from jitmoe.jit import UnsupportedSpecError
from jitmoe.jit.tuning import TuningStore
from jitmoe.ops import fused_moe as fm
from jitmoe.ops import moe_autotune as at
from jitmoe.ops import moe_gemm
from jitmoe.reference.moe import fused_moe_reference
from jitmoe.testing import rel_error

BF16 = torch.bfloat16


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty store under a private cache root, and no leftovers of other tests' tuning."""
    monkeypatch.setenv("JITMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JITMOE_TUNING", raising=False)
    monkeypatch.setattr(at, "_STORE", None)
    monkeypatch.setattr(at, "_DECODED", {})
    monkeypatch.setattr(at, "_FAILED", set())
    return tmp_path


@pytest.fixture
def cpu_pipeline(fresh, cpu_pipeline):
    """The CUDA pipeline on CPU tensors (conftest) with a fresh, private tuning store."""
    return cpu_pipeline


class FakeTimer:
    """Times from a function of the candidate; runs every candidate once so broken plumbing still fails."""

    def __init__(self, cost=None):
        self.cost = cost or (lambda name, cfg: 1.0)
        self.calls = []

    def __call__(self, run, candidate):
        run()
        self.calls.append(candidate)
        return self.cost(*candidate)


def make_problem(T=9, E=4, k=2, H=64, I=32, act="Swiglu"):
    rows = 2 * I if act in moe_gemm.GATED_ACTIVATIONS else I
    x = torch.randn(T, H).to(BF16)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    scales = torch.softmax(torch.randn(T, k), dim=-1)
    fc1 = (torch.randn(E, rows, H) / math.sqrt(H)).to(BF16)
    fc2 = (torch.randn(E, H, I) / math.sqrt(I)).to(BF16)
    return dict(x=x, ids=ids, scales=scales, fc1=fc1, fc2=fc2, act=act)


def run_pipeline(p, kernel="", k_splits=0):
    """One call of the CUDA pipeline's code on CPU tensors; checks it against the reference and returns it."""
    out = torch.full(p["x"].shape, float("nan"), dtype=p["x"].dtype)
    fm._run_cuda(out, p["x"], p["ids"], p["scales"].reshape(-1), p["fc1"], p["fc2"], None, None, {}, p["act"], 0,
                 kernel, k_splits)
    ref = fused_moe_reference(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], activation=p["act"],
                              out_dtype=torch.float32)
    assert rel_error(out, ref) < 1e-2
    return out


def key_of(p, arch="90a", sms=132):
    T, k = p["ids"].shape
    E, H, I = p["fc2"].shape
    return at.problem_key(arch=arch, num_sms=sms, dtype=BF16, gated=p["act"] in moe_gemm.GATED_ACTIVATIONS,
                          hidden=H, inter=I, num_local_experts=E, topk=k, num_tokens=T)


def forbid_heuristic(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the heuristic ran although a stored choice exists")
    monkeypatch.setattr(fm._gemm, "select_config", boom)


def spy_heuristic(monkeypatch):
    calls = []
    original = fm._gemm.select_config

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(fm._gemm, "select_config", spy)
    return calls


# -- the key ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (64, 64), (65, 128),
                                      (4096, 4096), (4097, 8192), (8192, 8192)])
def test_tokens_bucket_is_the_next_power_of_two(T, bucket):
    assert at.tokens_bucket(T) == bucket


def test_key_text_names_every_field_and_shares_a_bucket():
    kw = dict(arch="sm_90a", num_sms=132, dtype=BF16, gated=True, hidden=4096, inter=14336, num_local_experts=8,
              topk=2)
    key = at.problem_key(num_tokens=100, **kw)
    assert key.text == f"v{at.FORMAT_VERSION}/90a/sm132/bf16/gated/H4096/I14336/E8/k2/T128"
    assert at.problem_key(num_tokens=65, **kw) == key
    assert at.problem_key(num_tokens=129, **kw) != key
    assert at.problem_key(num_tokens=100, **{**kw, "gated": False}).text.count("/plain/") == 1
    assert at.problem_key(num_tokens=100, **{**kw, "dtype": torch.float16}).dtype == "fp16"


@pytest.mark.parametrize("field,value,error", [("dtype", torch.float32, ValueError), ("hidden", 0, ValueError),
                                               ("topk", 2.0, TypeError), ("gated", 1, TypeError),
                                               ("num_tokens", -1, ValueError), ("arch", "volta", ValueError)])
def test_key_errors_name_the_argument(field, value, error):
    kw = dict(arch="90a", num_sms=132, dtype=BF16, gated=True, hidden=64, inter=32, num_local_experts=4, topk=2,
              num_tokens=9)
    with pytest.raises(error, match=field):
        at.problem_key(**{**kw, field: value})


# -- the candidates --------------------------------------------------------------------------------------------------
KEYS = [dict(hidden=H, inter=I, num_local_experts=E, topk=k, num_tokens=T)
        for (H, I, E, k, T) in [(4096, 14336, 8, 2, 1), (2048, 768, 128, 8, 64), (7168, 2048, 256, 8, 16),
                                (2048, 1024, 64, 8, 4096), (256, 512, 8, 2, 64), (128, 128, 2, 2, 1)]]


@pytest.mark.parametrize("arch", ["80", "86", "89", "90a", "100", "120"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shape", KEYS)
def test_every_candidate_is_a_valid_spec_for_its_arch(arch, gated, shape):
    key = at.problem_key(arch=arch, num_sms=132, dtype=BF16, gated=gated, **shape)
    groups = at.candidate_groups(key)
    assert {g.kernel for g in groups} == set(moe_gemm.kernels_for_arch(arch))
    for g in groups:
        for gemm, configs, g_gated, n, k in (("gemm1", g.gemm1, gated, key.inter, key.hidden),
                                             ("gemm2", g.gemm2, False, key.hidden, key.inter)):
            assert configs and len(set(configs)) == len(configs)
            act = ("Swiglu" if g_gated else "Relu2") if gemm == "gemm1" else "Identity"
            for cfg in configs:
                assert (cfg.kernel, cfg.block_m) == (g.kernel, g.block_m)
                moe_gemm.gemm_spec(cfg, "bf16", gemm, act, (arch,))  # raises UnsupportedSpecError if not
                assert moe_gemm.smem_bytes(cfg, g_gated) <= moe_gemm.smem_limit(arch)
                if cfg.k_splits > 1:
                    assert cfg.kernel in moe_gemm.SPLIT_K_KERNELS
                    assert -(-k // cfg.block_k) >= 4 * cfg.k_splits and cfg.k_splits in (2, 4, 8)
            # the heuristic's tile leads: ties keep today's behaviour
            heuristic = moe_gemm.select_config(key.tokens * key.topk, key.num_local_experts, n, k, arch, BF16,
                                               kernel=g.kernel, k_splits=1, gated=g_gated)
            if heuristic.block_m == g.block_m:
                assert configs[0] == heuristic


def test_block_m_tiers_and_tile_variants_on_an_h100():
    key = at.problem_key(arch="90a", num_sms=132, dtype=BF16, gated=True, hidden=4096, inter=14336,
                         num_local_experts=8, topk=2, num_tokens=64)
    groups = {(g.kernel, g.block_m): g for g in at.candidate_groups(key)}
    assert set(groups) == {("sm90ws", 128), ("sm90", 64), ("sm90", 128), ("sm80", 16), ("sm80", 64), ("sm80", 128)}
    tiles = lambda cfgs: {(c.block_n, c.stages) for c in cfgs if c.k_splits == 1}  # noqa: E731
    assert tiles(groups[("sm90ws", 128)].gemm1) == {(128, 4)}
    assert tiles(groups[("sm90ws", 128)].gemm2) == {(128, 6), (256, 3)}
    assert {n for n, _ in tiles(groups[("sm90", 64)].gemm1)} == {64, 128}
    # few modules: at most two tiles per (kernel, block_m, GEMM)
    assert all(len(tiles(g.gemm1)) <= 2 and len(tiles(g.gemm2)) <= 2 for g in groups.values())


def test_split_k_candidates_only_where_the_gpu_has_idle_sms():
    decode = at.problem_key(arch="90a", num_sms=132, dtype=BF16, gated=True, hidden=2048, inter=8192,
                            num_local_experts=8, topk=1, num_tokens=1)
    splits = {c.k_splits for g in at.candidate_groups(decode) for c in g.gemm1 + g.gemm2}
    assert splits == {1, 2, 4, 8}
    prefill = decode._replace(tokens=16384)
    assert {c.k_splits for g in at.candidate_groups(prefill) for c in g.gemm1 + g.gemm2} == {1}


def test_restricted_candidates():
    key = at.problem_key(arch="90a", num_sms=132, dtype=BF16, gated=True, hidden=256, inter=512,
                         num_local_experts=8, topk=2, num_tokens=64)
    groups = at.candidate_groups(key, kernels=("sm90",), variants=False)
    assert [(g.kernel, g.block_m) for g in groups] == [("sm90", 64), ("sm90", 128)]
    defaults = set(moe_gemm.default_configs("sm90", "90a", True))
    assert {dataclasses.replace(c, k_splits=1) for g in groups for c in g.gemm1} <= defaults


# -- the choice ------------------------------------------------------------------------------------------------------
def test_tune_picks_the_group_with_the_smallest_sum(cpu_pipeline):
    p = make_problem()
    key = key_of(p)
    work = at.Workload(p["x"], p["ids"], p["scales"].reshape(-1), p["fc1"], p["fc2"], None, None, {}, "Swiglu", 0)
    groups = at.candidate_groups(key)
    target = groups[2]  # not the first: the argmin must win, not the order
    fast1, fast2 = target.gemm1[-1], target.gemm2[-1]
    cost = lambda name, cfg: {("gemm1", fast1): 1.0, ("gemm2", fast2): 2.0}.get((name, cfg), 5.0)  # noqa: E731
    timer = FakeTimer(cost)
    choice = at.tune(work, key, timer=timer)
    assert choice.configs == (fast1, fast2) and (choice.gemm1_ms, choice.gemm2_ms) == (1.0, 2.0)
    assert len(timer.calls) == sum(len(g.gemm1) + len(g.gemm2) for g in groups)
    # GEMM1 and GEMM2 are chosen per group: a fast GEMM1 of one group and a fast GEMM2 of another do not mix
    other = groups[3]
    cost = lambda name, cfg: {("gemm1", target.gemm1[0]): 1.0, ("gemm2", other.gemm2[0]): 1.0}.get(  # noqa: E731
        (name, cfg), 5.0)
    choice = at.tune(work, key, timer=FakeTimer(cost))
    assert choice.gemm1.block_m == choice.gemm2.block_m and choice.gemm1.kernel == choice.gemm2.kernel


def test_failing_candidates_are_skipped(cpu_pipeline):
    p = make_problem()
    key = key_of(p)
    work = at.Workload(p["x"], p["ids"], p["scales"].reshape(-1), p["fc1"], p["fc2"], None, None, {}, "Swiglu", 0)
    errors = iter([UnsupportedSpecError("no"), RuntimeError("build failed"), ValueError("bad")] * 100)

    def flaky(run, candidate):
        if candidate[1].kernel != "sm80":
            raise next(errors)
        return 1.0
    choice = at.tune(work, key, timer=flaky)
    assert choice.gemm1.kernel == "sm80"

    def broken(run, candidate):
        raise RuntimeError("nothing builds")
    assert at.tune(work, key, timer=broken) is None


def test_autotune_tunes_once_stores_and_reuses(cpu_pipeline, monkeypatch):
    p = make_problem()
    key = key_of(p)
    timer = FakeTimer(lambda name, cfg: 1.0 if cfg.kernel == "sm90" and cfg.block_n == 64 else 3.0)
    with jitmoe.autotune(), at.options(timer=timer):
        run_pipeline(p)
        assert timer.calls
        stored = at.lookup(key)
        assert stored[0].kernel == "sm90" and stored[0].block_n == 64 and stored[1].block_n == 64
        count = len(timer.calls)
        run_pipeline(make_problem(T=17))  # another bucket (32): tuned again
        assert len(timer.calls) > count
        count = len(timer.calls)
        run_pipeline(p)
        assert len(timer.calls) == count  # stored: not measured again
    forbid_heuristic(monkeypatch)
    run_pipeline(p)  # outside the context, the stored choice runs (the heuristic would raise)
    data = json.loads(at.store().path.read_text())
    assert key.text in data["entries"]
    assert TuningStore(at.STORE_NAME).get(key.text) == data["entries"][key.text]


def test_bucket_shares_the_stored_choice(cpu_pipeline, monkeypatch):
    p = make_problem(T=9)
    timer = FakeTimer()
    with jitmoe.autotune(), at.options(timer=timer):
        run_pipeline(p)
    forbid_heuristic(monkeypatch)
    run_pipeline(make_problem(T=16))  # T=9 and T=16 share the bucket 16


def test_stored_choice_survives_a_new_process_store(cpu_pipeline, monkeypatch):
    p = make_problem()
    with jitmoe.autotune(), at.options(timer=FakeTimer()):
        run_pipeline(p)
    stored = at.lookup(key_of(p))
    monkeypatch.setattr(at, "_STORE", None)  # as a new process: read back from disk
    monkeypatch.setattr(at, "_DECODED", {})
    assert at.lookup(key_of(p)) == stored


def test_forced_kernel_or_split_bypasses_stored_choices(cpu_pipeline, monkeypatch):
    p = make_problem()
    timer = FakeTimer(lambda name, cfg: 1.0 if cfg.kernel == "sm90" else 3.0)
    with jitmoe.autotune(), at.options(timer=timer):
        run_pipeline(p)
        count = len(timer.calls)
        calls = spy_heuristic(monkeypatch)
        run_pipeline(p, kernel="sm80")
        run_pipeline(p, k_splits=2)
        run_pipeline(make_problem(T=40), kernel="sm80")  # a new key, forced: not tuned either
    assert len(timer.calls) == count
    assert [c["kernel"] for c in calls] == ["sm80", "sm80", None, None, "sm80", "sm80"]
    assert [c["k_splits"] for c in calls][2:4] == [2, 2]


def test_tune_mode_false_only_looks_up(cpu_pipeline, monkeypatch):
    p = make_problem()
    timer = FakeTimer()
    with jitmoe.autotune(False), at.options(timer=timer):
        calls = spy_heuristic(monkeypatch)
        run_pipeline(p)
    assert not timer.calls and len(calls) == 2 and at.lookup(key_of(p)) is None


def test_no_tuning_under_capture_or_tracing(cpu_pipeline, monkeypatch):
    p = make_problem()
    timer = FakeTimer()
    monkeypatch.setattr(at, "can_tune", lambda x: False)
    with jitmoe.autotune(), at.options(timer=timer):
        run_pipeline(p)
    assert not timer.calls and at.lookup(key_of(p)) is None


def test_can_tune_refuses_fake_tensors_and_compilation(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert at.can_tune(torch.ones(2))
    with FakeTensorMode():
        fake = torch.empty(2)
    assert not at.can_tune(fake)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not at.can_tune(torch.ones(2))


def test_jitmoe_tuning_0_ignores_stored_choices_and_never_tunes(cpu_pipeline, monkeypatch):
    p = make_problem()
    with jitmoe.autotune(), at.options(timer=FakeTimer()):
        run_pipeline(p)
    assert at.lookup(key_of(p)) is not None
    monkeypatch.setenv("JITMOE_TUNING", "0")
    assert at.lookup(key_of(p)) is None
    timer = FakeTimer()
    calls = spy_heuristic(monkeypatch)
    with jitmoe.autotune(), at.options(timer=timer):
        run_pipeline(make_problem(T=40))
    assert not timer.calls and len(calls) == 2


def test_invalid_stored_choices_are_ignored_with_a_warning(cpu_pipeline, monkeypatch):
    p = make_problem()
    key = key_of(p)
    calls = spy_heuristic(monkeypatch)
    good = {"kernel": "sm90", "block_m": 64, "block_n": 128, "block_k": 64, "stages": 4, "k_splits": 1}
    bad_values = [{"gemm1": good}, {"gemm1": good, "gemm2": dict(good, block_m=128)},
                  {"gemm1": dict(good, kernel="sm90ws"), "gemm2": dict(good, kernel="sm90ws")},  # bm 64 on sm90ws
                  {"gemm1": dict(good, block_n=24), "gemm2": good},  # not a GemmConfig
                  {"gemm1": dict(good, block_n=96), "gemm2": good},  # a GemmConfig, not a candidate
                  {"gemm1": dict(good, k_splits=16), "gemm2": good}, "garbage"]
    for value in bad_values:
        at.store().put(key.text, value)
        with pytest.warns(RuntimeWarning, match="ignoring the stored tuning choice"):
            assert at.lookup(key) is None
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per stored value
            run_pipeline(p)
        assert len(calls) == 2
    at.store().put(key.text, {"gemm1": good, "gemm2": good})
    assert at.lookup(key) == (moe_gemm.GemmConfig(**good),) * 2
    at.store().put(key_of(p, arch="80").text, {"gemm1": good, "gemm2": good})
    with pytest.warns(RuntimeWarning, match="arch 80"):
        assert at.lookup(key_of(p, arch="80")) is None


# -- autotune(cache=...) and its arguments ---------------------------------------------------------------------------
def test_cache_file_is_saved_on_exit_and_loaded_on_entry(cpu_pipeline, monkeypatch, tmp_path):
    p = make_problem()
    key = key_of(p)
    path = tmp_path / "tuned.json"
    with jitmoe.autotune(cache=str(path)), at.options(timer=FakeTimer()):
        run_pipeline(p)
        assert not path.exists()  # written on exit
    stored = at.lookup(key)
    assert json.loads(path.read_text())["entries"][key.text]
    fresh = TuningStore("elsewhere")
    assert fresh.load_file(path) == 1 and fresh.get(key.text) == at.store().get(key.text)
    # a new process with an empty cache: the file's choices apply inside autotune(False, cache=path) and after
    monkeypatch.setenv("JITMOE_CACHE_DIR", str(tmp_path / "other_cache"))
    monkeypatch.setattr(at, "_STORE", None)
    monkeypatch.setattr(at, "_DECODED", {})
    before = path.read_text()
    with jitmoe.autotune(False, cache=path):  # a PathLike works too
        assert at.lookup(key) == stored
    assert path.read_text() == before  # tune_mode False does not save
    assert at.lookup(key) == stored  # loaded choices stay for the process


def test_missing_cache_file_is_created(cpu_pipeline, tmp_path):
    path = tmp_path / "new" / "dir" / "tuned.json"
    with jitmoe.autotune(cache=path):
        pass
    assert json.loads(path.read_text())["entries"] == {}


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(tune_mode="yes"), TypeError, "tune_mode"), (dict(tune_mode=1), TypeError, "tune_mode"),
    (dict(cache=123), TypeError, "cache"), (dict(cache=b"/tmp/x.json"), TypeError, "cache"),
    (dict(cache=""), ValueError, "cache"), (dict(cache="DIR"), ValueError, "directory")])
def test_autotune_bad_arguments_raise(fresh, tmp_path, kwargs, error, match):
    if kwargs.get("cache") == "DIR":
        kwargs["cache"] = str(tmp_path)
    with pytest.raises(error, match=match):
        with jitmoe.autotune(**kwargs):
            pass
    assert at._tune_mode is False


def test_autotune_accepts_flashinfers_other_arguments_and_restores_the_mode(fresh):
    with jitmoe.autotune(True, None, tuning_buckets=(1, 2, 4), round_up=True, skip_ops=["x"]):
        assert at._tune_mode is True
        with jitmoe.autotune(False):
            assert at._tune_mode is False
        assert at._tune_mode is True
    assert at._tune_mode is False
    with pytest.raises(KeyError):
        with jitmoe.autotune():
            raise KeyError("body error")
    assert at._tune_mode is False


@pytest.mark.parametrize("kwargs,error", [(dict(kernels=["sm70"]), ValueError), (dict(variants=1), TypeError),
                                          (dict(timer=3), TypeError)])
def test_options_bad_arguments_raise(kwargs, error):
    with pytest.raises(error):
        with at.options(**kwargs):
            pass


# -- prewarm ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_prewarm_covers_every_swiglu_candidate_module(arch):
    specs = set(at.PREWARM["fused_moe_autotune"](["bf16", "fp16", "fp32"], [2, 8], [arch]))
    assert specs and all(s.archs == (arch,) for s in specs)
    for shape in KEYS:
        key = at.problem_key(arch=arch, num_sms=132, dtype=BF16, gated=True, **shape)
        for g in at.candidate_groups(key):
            for dtype in ("bf16", "fp16"):
                assert {moe_gemm.gemm_spec(c, dtype, "gemm1", "Swiglu", (arch,)) for c in g.gemm1} <= specs
                assert {moe_gemm.gemm_spec(c, dtype, "gemm2", "Identity", (arch,)) for c in g.gemm2} <= specs
