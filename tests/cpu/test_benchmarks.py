"""The benchmark scripts on the CPU: floor/byte helpers against hand-computed numbers, the torch peers against a
float64 reference, exp_topk_latency end to end (schema, every top-k applied, bad top-k rejected), the smoke modes
of bench_routers / bench_fused_moe / bench_dense_reference, and sweep_sm90ws's row loop with its kernels stubbed."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _common as common  # noqa: E402
import bench_dense_reference  # noqa: E402
import bench_fused_moe  # noqa: E402
import bench_routers  # noqa: E402
import exp_topk_latency as exp  # noqa: E402
import sweep_sm90ws  # noqa: E402
from jitmoe.ops import moe_gemm, permute  # noqa: E402
from jitmoe.reference import moe as moe_ref  # noqa: E402

# Ceilings recorded in shared/anchors/h100-2026-11-22*.json, whose floor_ms the helpers must reproduce.
H100 = {"copy_TBps": 2.958031740499292, "bf16_TFLOPs": 747.8449981545665}
H100_OMNI_COPY = {"copy_TBps": 2.8998730483628505, "bf16_TFLOPs": 747.8449981545665}
STAT_KEYS = {"P50", "P95", "P99", "mean", "std", "min", "max"}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # The smoke runs are many tiny ops: intra-op threads only add barrier waits (10x slower on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jitmoe_layer_available() -> bool:
    return common.jitmoe_attr("nn.FusedMoE") is not None and common.jitmoe_attr("topk_softmax") is not None


# ----------------------------------------------------------------------------------------------- helpers

def test_moe_bytes_flops_and_floor_match_hand_computed_anchor_rows():
    # Mixtral T=1 with its 2 experts: 2 * 3*4096*14336 * 2 B weights + 2 * 4096 * 2 B activations.
    nbytes = bench_fused_moe.moe_bytes(2, 1, 4096, 14336)
    assert nbytes == 704_659_456
    assert bench_fused_moe.moe_flops(1, 2, 4096, 14336) == 704_643_072
    floor, bound = common.floor_ms(nbytes, bench_fused_moe.moe_flops(1, 2, 4096, 14336), H100)
    assert bound == "mem" and floor == pytest.approx(0.23821903137559272, rel=1e-12)
    # Mixtral T=16384 is compute bound: 6*T*k*H*I FLOPs at the measured peak.
    flops = bench_fused_moe.moe_flops(16384, 2, 4096, 14336)
    assert flops == 11_544_872_091_648
    floor, bound = common.floor_ms(bench_fused_moe.moe_bytes(8, 16384, 4096, 14336), flops, H100)
    assert bound == "compute" and floor == pytest.approx(15.437519967556, rel=1e-12)
    assert bench_fused_moe.weight_bytes(bench_fused_moe.SHAPES["deepseek-v3"]) == 256 * 3 * 7168 * 2048 * 2


def test_expected_distinct_experts():
    assert common.expected_distinct(8, 2, 1) == pytest.approx(2.0)
    assert common.expected_distinct(256, 8, 16) == pytest.approx(256 * (1 - (31 / 32) ** 16))
    assert common.expected_distinct(64, 8, 100_000) == pytest.approx(64.0)


def test_router_and_omni_bytes():
    assert bench_routers.router_bytes(65536, 256, 8, torch.float32) == {"logits": 67_108_864, "outputs": 4_194_304}
    assert bench_routers.router_bytes(1, 64, 8, torch.bfloat16) == {"logits": 128, "outputs": 64}
    omni = bench_routers.omni_bytes(16384, 256, 32, torch.bfloat16)
    assert omni["fwd"] == 2 * 16384 * 256 * 2 + 16384 * 32 * (2 + 4) == 19_922_944
    assert omni["fwdbwd"] == omni["fwd"] + 16384 * 32 * 6 + 2 * 16384 * 256 * 2
    assert common.floor_ms(omni["fwd"], 0, H100_OMNI_COPY)[0] == pytest.approx(0.006870281446026638, rel=1e-12)


def test_parse_ints_and_slug():
    assert common.parse_ints("1, 2,4") == (1, 2, 4)
    with pytest.raises(ValueError, match="comma-separated"):
        common.parse_ints("1,x")
    assert common.device_slug(torch.device("cpu")) == "cpu"
    assert common.geomean([0.5, 2.0, None]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- torch peers

def dense_moe_reference(x, ids, scales, w13, w2):
    """Token by token, float64: the definition the peers must compute."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            out[t] += scales[t, j].double() * (w2[e].double() @ (torch.nn.functional.silu(h[inter:]) * h[:inter]))
    return out


def test_fused_moe_peers_compute_the_moe_layer():
    shape = bench_fused_moe.MoEShape(16, 4, 64, 32)
    w13, w2 = bench_fused_moe.make_weights(shape, "cpu", torch.float32, 1)[0]
    x, ids, scales = bench_fused_moe.make_routing(shape, 37, "cpu", torch.float32)
    ref = dense_moe_reference(x, ids, scales, w13, w2)
    fp32 = bench_fused_moe.torch_loop_moe(x, ids, scales, w13, w2, compute_dtype=torch.float32)
    assert bench_fused_moe.device_rel_error(fp32, ref) < 1e-5
    bf16 = [t.bfloat16() for t in (x, w13, w2)]
    for peer in (bench_fused_moe.torch_loop_moe, bench_fused_moe.grouped_mm_moe):
        out = peer(bf16[0], ids, scales, bf16[1], bf16[2])
        assert out.dtype == torch.bfloat16 and bench_fused_moe.device_rel_error(out, ref) < 2e-2


def test_router_composites():
    x, y = torch.randn(9, 17), torch.randn(9, 17)  # continuous values: no ties
    brute = bench_routers.torch_omni_brute(x, y, 7)
    cand = bench_routers.torch_omni_candidates(x, y, 7)
    assert torch.equal(brute[1], cand[1]) and torch.allclose(brute[0], cand[0])
    logits = torch.randn(33, 16)
    w, ids = bench_routers.torch_grouped_topk(logits, 4, torch.zeros(16), n_group=4, topk_group=2,
                                              routed_scaling_factor=2.0)
    assert ids.dtype == torch.int32 and torch.allclose(w.sum(-1), torch.full((33,), 2.0))
    assert all(len({int(e) // 4 for e in row}) <= 2 for row in ids)  # only experts of the 2 kept groups
    w, ids = bench_routers.torch_expert_choice(logits, 4, 1.25)
    assert w.shape == ids.shape == (33, 4) and bool((w > 0).all())


# ----------------------------------------------------------------------------------------------- exp_topk_latency

def tiny_run_args(tmp_path, *extra):
    return ["--tiny", "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path), "--num-samples", "2",
            "--warmup", "1", "--prompt-len", "8", "--decode-tokens", "2", *extra]


def test_exp_topk_latency_end_to_end(tmp_path):
    impl = "both" if jitmoe_layer_available() else "torch"
    payload = exp.main(tiny_run_args(tmp_path, "--implementation", impl))
    files = list(tmp_path.glob("exp_topk_latency_cpu_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == json.loads(json.dumps(payload, default=str))
    results = payload["results"]
    assert set(results) == ({"torch", "jitmoe"} if impl == "both" else {"torch"})
    assert payload["top_k_values"] == [1, 2, 4, 8]  # the default sweep cut at the tiny model's 8 experts
    for entries in results.values():
        assert [e["top_k"] for e in entries] == [1, 2, 4, 8]
        for e in entries:
            for phase in ("prefill", "decode"):
                assert set(e[phase]) == STAT_KEYS
                assert 0 < e[phase]["min"] <= e[phase]["P50"] <= e[phase]["max"]
                assert e["scaling"][phase] > 0 and e["efficiency"][phase] > 0
            check = e["verification"]
            assert check["ok"] and check["blocks_changed"] == check["blocks"] == exp.TINY.layers
            assert check["routing_ids_widths"] == [e["top_k"]]
        assert entries[0]["scaling"] == {"prefill": 1.0, "decode": 1.0}


@pytest.mark.parametrize("bad", ["0", "9", "-1"])
def test_exp_topk_latency_rejects_bad_top_k(tmp_path, bad):
    with pytest.raises(SystemExit, match=r"top_k: expected 1 <= top_k <= 8 \(the number of experts\), got " + bad):
        exp.main(tiny_run_args(tmp_path, "--implementation", "torch", f"--top-k-values={bad}"))
    assert not list(tmp_path.iterdir())  # nothing was run or written


def test_set_top_k_validates_and_verification_catches_a_missed_block():
    stack = exp.DecoderStack(exp.TINY, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"top_k: expected 1 <= top_k <= 8"):
        exp.set_top_k(stack, 9)
    with pytest.raises(TypeError, match="top_k: expected an int"):
        exp.set_top_k(stack, 2.0)
    assert exp.set_top_k(stack, 3) == exp.TINY.layers
    assert exp.verify_top_k(stack, 3, exp.TINY.layers, "cpu", torch.float32)["routing_ids_widths"] == [3]
    stack.layers[0].mlp.top_k = 2  # one block left behind: the probe must see a width-2 router
    with pytest.raises(RuntimeError, match="did not take effect"):
        exp.verify_top_k(stack, 3, exp.TINY.layers, "cpu", torch.float32)


# ----------------------------------------------------------------------------------------------- smoke modes

def test_bench_routers_cpu_smoke(tmp_path):
    payload = bench_routers.main(["--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    assert list(tmp_path.glob("bench_routers_cpu_*.json"))
    grid = bench_routers.GRIDS["cpu"]
    assert len(payload["rows"]) == len(bench_routers.ROUTER_CASES) * len(grid["T"]) * len(grid["E"])
    for row in payload["rows"]:
        assert row["torch_ms"] > 0 and row["floor_ms"] > 0
        if common.jitmoe_attr(row["router"]) is not None:
            assert row["jitmoe_ms"] > 0, row
            assert row.get("weights_rel_err", 0.0) < 1e-5, row
        else:
            assert "not available" in row["note"]
    omni = payload["omni_rows"][0]
    assert omni["torch_candidates_fwd_ms"] > 0 and omni["torch_brute_fwdbwd_ms"] > 0
    assert {t["verdict"] for t in payload["targets"]} == {"n/a"}  # the target rows are GPU-sized


def test_bench_fused_moe_cpu_smoke(tmp_path):
    payload = bench_fused_moe.main(["--device", "cpu", "--out", str(tmp_path), "--shapes", "tiny", "--tokens", "3",
                                    "--split-k", "1,2", "--no-plot"])
    assert list(tmp_path.glob("bench_fused_moe_cpu_*.json"))
    (row,) = payload["rows"]
    assert (row["shape"], row["T"]) == ("tiny", 3) and row["bound"] in ("mem", "compute")
    assert row["floor_ms"] > 0 and 1 <= row["distinct_experts"] <= 6
    expected = {"torch_loop", "grouped_mm"} | ({"jitmoe"} if common.jitmoe_attr("cutlass_fused_moe") else set())
    assert expected <= {impl for impl, res in row["impls"].items() if "ms" in res}
    for impl in expected:
        assert row["impls"][impl]["err"] < 2e-2, (impl, row["impls"][impl])
    assert "split_k" in row and row["split_k"]["knob"]


def test_bench_dense_reference_cpu_smoke(tmp_path):
    payload = bench_dense_reference.main(["--device", "cpu", "--shapes", "tiny,tiny-fine", "--tokens", "3,32",
                                          "--min-rows", "2", "--rounds", "1", "--out", str(tmp_path)])
    # tiny (E 8, k 2): 3 tokens give 0 rows per expert (skipped), 32 give 8; tiny-fine (E 16, k 4): 0 and 8
    assert [(r["shape"], r["T"], r["rows_per_expert"]) for r in payload["rows"]] == [("tiny", 32, 8),
                                                                                   ("tiny-fine", 32, 8)]
    for r in payload["rows"]:
        assert r["flops"] == bench_fused_moe.moe_flops(32, *{"tiny": (2, 64, 32), "tiny-fine": (4, 32, 16)}[r["shape"]])
        assert len(r["dense_ms"]) == len(r["jitmoe_ms"]) == 1 and min(r["dense_ms"] + r["jitmoe_ms"]) > 0
        assert r["jitmoe_over_dense"] == pytest.approx(r["jitmoe_ms"][0] / r["dense_ms"][0])
    written = json.loads(next(tmp_path.glob("bench_dense_reference_*.json")).read_text())
    assert written["rows"] == json.loads(json.dumps(payload["rows"]))


@pytest.mark.parametrize("T", [5, 100])  # 10 slots: direct rows (no gather), as in the pipeline; 200: gathered
def test_sweep_sm90ws_row_loop_passes_consistent_gemm_arguments(monkeypatch, T):
    """sweep_row on the CPU with moe_align's reference and a stub module per variant that checks what each GEMM
    launch is given against the binding's contract (the sm90ws kernels themselves need an H100)."""
    shape = bench_fused_moe.MoEShape(8, 2, 64, 32)
    gathers = T * shape.k > moe_gemm.DIRECT_A_MAX_ROWS_PER_EXPERT * shape.E
    calls = []

    def align_into(ids, num_experts, block_m, offset, outputs):
        for out, ref in zip(outputs, moe_ref.moe_align_reference(ids, num_experts, block_m, offset)):
            out[: ref.numel()].copy_(ref.reshape(-1))

    class Stub:
        def __init__(self, variant):
            self.variant = variant

        def run(self, a, b, bias, out, sorted_ids, block_expert, num_padded, weights, alpha, beta, limit,
                num_slots, topk, n, k, partials, a_sorted, slot_rows, slot_rows_filled, k_splits, acc_scale,
                out_scale, w_scale, block_done, block_done_n_blocks):
            assert acc_scale is None and out_scale is None and w_scale is None  # the sweep runs 16-bit tiles
            assert block_done is None and block_done_n_blocks == 0  # each GEMM timed alone: no counters
            mode = self.variant[0]
            m_pad_max = sorted_ids.numel()
            assert (num_slots, k_splits, a.shape[1], b.shape[2]) == (T * shape.k, 1, k, k)
            assert block_expert.numel() * sweep_sm90ws.BLOCK_M == m_pad_max and num_padded.numel() == 1
            if mode == "gemm1":
                assert (topk, n, k) == (shape.k, shape.I, shape.H) and a.shape[0] == T
                assert tuple(b.shape) == (shape.E, 2 * shape.I, shape.H) and weights is None
                assert tuple(out.shape) == (m_pad_max, n) and slot_rows_filled is False
                if gathers:
                    assert tuple(a_sorted.shape) == (m_pad_max, k) and slot_rows.numel() == num_slots
                else:
                    assert a_sorted is None and slot_rows is None
            else:
                assert (topk, n, k) == (1, shape.H, shape.I) and tuple(a.shape) == (m_pad_max, k)
                assert tuple(out.shape) == (num_slots, n) and weights.numel() == num_slots
                assert a_sorted is None and slot_rows is None and slot_rows_filled is False
            calls.append(self.variant)

    monkeypatch.setattr(permute, "align_into", align_into)
    monkeypatch.setattr(sweep_sm90ws, "module", lambda *variant: Stub(variant))
    variants = ["gemm1:128:4:2", "gemm2:256:3:1"]
    rows = sweep_sm90ws.sweep_row(shape, T, variants, torch.device("cpu"))
    assert [r["variant"] for r in rows] == variants and all(r["T"] == T for r in rows)
    assert {c[0] for c in calls} == {"gemm1", "gemm2"}
    assert all(r["median_ms"] > 0 and r["TFLOPs"] > 0 for r in rows)
    assert rows[0]["padded_rows"] % sweep_sm90ws.BLOCK_M == 0 and rows[0]["padded_rows"] >= T * shape.k


def test_resolve_shapes_takes_names_held_out_shapes_and_literals():
    cpu = torch.device("cpu")
    assert bench_fused_moe.resolve_shapes(None, cpu) == bench_fused_moe.CPU_SHAPES
    chosen = bench_fused_moe.resolve_shapes("mixtral,deepseek-v2,160:6:5120:1536", cpu)
    assert chosen == {"mixtral-8x7b": bench_fused_moe.MoEShape(8, 2, 4096, 14336),
                      "deepseek-v2": bench_fused_moe.MoEShape(160, 6, 5120, 1536),
                      "E160-k6-H5120-I1536": bench_fused_moe.MoEShape(160, 6, 5120, 1536)}
    for bad in ("nope", "8:2:64", "8:0:64:32", "8:2:x:32", "4:8:64:32"):
        with pytest.raises(SystemExit, match="--shapes"):
            bench_fused_moe.resolve_shapes(bad, cpu)
