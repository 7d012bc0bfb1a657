"""cutlass_fused_moe in INT8 weight-only per-channel mode (W8A16, use_int8_woq_per_channel) on the GPU against the
fp32 reference with the dequantized weights (int8 values times their row's scale), on the decode path and the
grouped GEMMs (sm90ws on sm_90a, sm80). Outputs are poisoned (NaN) before every run."""
import pytest
import torch

import jitmoe
from jitmoe import quant
from jitmoe.ops import fused_moe as fm
from jitmoe.ops import moe_decode
from jitmoe.ops import moe_gemm as mg
from jitmoe.ops import permute
from jitmoe.reference.moe import GATED_ACTIVATIONS, fused_moe_reference
from jitmoe.testing import poison_, rel_error

pytestmark = pytest.mark.gpu
# int8 weights times their scales are what the reference multiplies by, so the kernels owe the 16-bit layer's
# accuracy: GEMM1's output rounded to x's dtype, fp32 accumulation (tests/gpu/test_fused_moe.py's TOL).
TOL = 1e-2
BF16, FP16 = torch.bfloat16, torch.float16
DEV = "cuda"


def make_problem(T, E, k, H, I, dtype=BF16, act="Swiglu", bias=False, scale_dtype=None):
    """Realistically scaled 16-bit weights (kept as w1, w2) and their int8 per-channel quantization."""
    rows = 2 * I if act in GATED_ACTIVATIONS else I
    x = torch.randn(T, H, device=DEV).to(dtype)
    w1 = (torch.randn(E, rows, H, device=DEV) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEV) * I ** -0.5).to(dtype)
    fc1, s1 = quant.quantize_int8_per_channel(w1, scale_dtype)
    fc2, s2 = quant.quantize_int8_per_channel(w2, scale_dtype)
    ids = torch.rand(T, E, device=DEV).argsort(dim=1)[:, :k].int().contiguous()
    weights = torch.softmax(torch.randn(T, k, device=DEV), dim=-1)
    b1 = torch.randn(E, rows, device=DEV, dtype=dtype) * 0.1 if bias else None
    b2 = torch.randn(E, H, device=DEV, dtype=dtype) * 0.1 if bias else None
    return dict(x=x, ids=ids, weights=weights, fc1=fc1, fc2=fc2, s1=s1, s2=s2, b1=b1, b2=b2, w1=w1, w2=w2,
                dtype=dtype, act=act)


def call(p, output, **kw):
    return jitmoe.cutlass_fused_moe(p["x"], p["ids"], p["weights"], p["fc1"], p["fc2"], p["dtype"], [p["s1"], p["s2"]],
                                    fc1_expert_biases=p["b1"], fc2_expert_biases=p["b2"], output=output,
                                    activation_type=fm.ActivationType[p["act"]], use_int8_woq_per_channel=True, **kw)


def run(p, output=None, **kw):
    """One call with a freshly poisoned output; returns it (checking it is the list's element 0)."""
    output = poison_(torch.empty(p["x"].shape, dtype=p["dtype"], device=DEV) if output is None else output)
    res = call(p, output, **kw)
    assert isinstance(res, list) and res[0] is output
    return output


def reference(p, **kw):
    return fused_moe_reference(p["x"], p["ids"], p["weights"], p["fc1"], p["fc2"], fc1_expert_biases=p["b1"],
                               fc2_expert_biases=p["b2"], activation=p["act"], out_dtype=torch.float32,
                               fc1_weight_scales=p["s1"], fc2_weight_scales=p["s2"], **kw)


def takes_decode(T, E, k, H, I):
    return moe_decode.use_decode(T, k, E, H, I, 2, 1)  # 16-bit operands, int8 weights


def on_hopper() -> bool:
    return fm._device_arch(torch.cuda.current_device()) == "90a"


def needs_hopper(kernel):
    if kernel == "sm90ws" and not on_hopper():
        pytest.skip("the sm90ws kernel needs an sm_90a GPU")


# (T, E, k, H, I, the heuristic's path): one token; a few tokens on many experts; few rows per expert; many rows;
# one expert with top-1 (GEMM2 writes the output rows itself); H, I multiples of 16 but not of 64 (K and N tails).
SHAPES = [(1, 8, 2, 256, 256, "decode"), (3, 64, 4, 1024, 512, "decode"), (16, 64, 8, 1024, 768, "grouped"),
          (1000, 8, 2, 1024, 1024, "grouped"), (300, 1, 1, 256, 384, "grouped"), (777, 32, 4, 1040, 272, "grouped")]


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("T,E,k,H,I,path", SHAPES)
def test_matches_reference(T, E, k, H, I, path, dtype):
    assert takes_decode(T, E, k, H, I) == (path == "decode")  # the case covers the path it is meant to
    p = make_problem(T, E, k, H, I, dtype)
    assert p["s1"].dtype == dtype  # quantize_int8_per_channel's default: the weights' 16-bit dtype
    out = run(p)
    assert rel_error(out, reference(p)) <= TOL
    # The output the library allocates itself: the layer's dtype and shape, and the same bits.
    own = call(p, None)[0]
    assert own.dtype == dtype and own.shape == p["x"].shape
    assert torch.equal(own, out)


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("T", [2, 600])  # decode, grouped
def test_fp32_and_16bit_scales(T, dtype):
    p32 = make_problem(T, 16, 4, 512, 256, dtype, bias=True, scale_dtype=torch.float32)
    assert p32["s1"].dtype == p32["s2"].dtype == torch.float32
    assert rel_error(run(p32), reference(p32)) <= TOL
    (fc1, s1), (fc2, s2) = quant.quantize_int8_per_channel(p32["w1"]), quant.quantize_int8_per_channel(p32["w2"])
    p16 = dict(p32, fc1=fc1, s1=s1, fc2=fc2, s2=s2)
    assert s1.dtype == s2.dtype == dtype
    assert rel_error(run(p16), reference(p16)) <= TOL


@pytest.mark.parametrize("act", ["Swiglu", "Geglu", "Relu2", "Gelu", "Identity"])
@pytest.mark.parametrize("T", [2, 600])  # decode, grouped
def test_activations_and_biases(act, T):
    p = make_problem(T, 16, 2, 512, 256, act=act, bias=True)
    assert p["fc1"].shape[1] == (512 if act in GATED_ACTIVATIONS else 256)
    assert rel_error(run(p), reference(p)) <= TOL


# Each path off its heuristic range (decode with 16 tokens: 64 slots over 16 experts; the grouped kernels with 2),
# and both grouped kernels at a size the heuristic gives them.
@pytest.mark.parametrize("kernel,T", [(fm.DECODE, 16), ("sm80", 2), ("sm90ws", 2), ("sm80", 600), ("sm90ws", 600)])
def test_forced_paths_match_reference(kernel, T):
    needs_hopper(kernel)
    p = make_problem(T, 16, 4, 512, 512, bias=True)
    with fm.force_kernel(kernel):
        out = run(p)
    assert rel_error(out, reference(p)) <= TOL


@pytest.mark.parametrize("k_splits", [2, 4])
def test_forced_split_k_matches_reference_and_is_deterministic(k_splits):
    p = make_problem(16, 8, 2, 2048, 512, bias=True)
    with fm.force_kernel("sm80"), fm.force_split_k(k_splits):
        first = run(p).clone()
        second = run(p)
    assert rel_error(first, reference(p)) <= TOL
    assert torch.equal(first, second)


# The heuristic's paths are the decode kernels (one token) and the grouped GEMMs (many; on sm_90a sm80 for few rows
# per expert of small experts, else sm90ws): forcing the path it takes gives the same bits.
@pytest.mark.parametrize("T,E,kernel", [(1, 64, fm.DECODE), (64, 64, "sm80"), (600, 16, "sm90ws")])
def test_heuristic_takes_the_expected_path(T, E, kernel):
    arch = fm._device_arch(torch.cuda.current_device())
    chosen = mg.select_config(T * 8, E, 256, 512, arch, BF16, weight="s8").kernel
    assert takes_decode(T, E, 8, 512, 256) == (kernel == fm.DECODE)
    if kernel != fm.DECODE:
        assert chosen == (kernel if on_hopper() else "sm80")
        kernel = chosen
    p = make_problem(T, E, 8, 512, 256)
    heuristic = run(p).clone()
    with fm.force_kernel(kernel):
        forced = run(p)
    assert torch.equal(heuristic, forced)


@pytest.mark.parametrize("T", [2, 500])  # decode, grouped
def test_expert_parallel_two_ranks_sum_to_full(T):
    E, ep = 8, 2
    p = make_problem(T, E, 2, 256, 512, bias=True)
    full = reference(p)
    total = torch.zeros(p["x"].shape, dtype=torch.float32, device=DEV)
    for rank in range(ep):
        local = slice(rank * E // ep, (rank + 1) * E // ep)
        shard = dict(p, **{n: p[n][local].contiguous() for n in ("fc1", "fc2", "s1", "s2", "b1", "b2")})
        out = run(shard, ep_size=ep, ep_rank=rank)
        assert rel_error(out, reference(shard, ep_size=ep, ep_rank=rank)) <= TOL
        no_local = ~((p["ids"] >= local.start) & (p["ids"] < local.stop)).any(dim=1)
        assert torch.all(out[no_local] == 0)
        total += out.float()
    assert rel_error(total, full) <= TOL


# T = 2 takes the decode path, T = 700 the grouped GEMMs.
@pytest.mark.parametrize("T,k", [(2, 2), (700, 8)])
def test_cuda_graph_capture_and_replay(T, k):
    shape = (T, 32, k, 256, 512)
    p = make_problem(*shape, bias=True)
    out = torch.empty(p["x"].shape, dtype=p["dtype"], device=DEV)
    run(p, out)  # builds and loads the modules outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(p, out)
    fresh = make_problem(*shape, bias=True)
    for name in ("x", "ids", "weights", "fc1", "fc2", "s1", "s2", "b1", "b2"):
        p[name].copy_(fresh[name])
    poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out, reference(p)) <= TOL


@pytest.mark.parametrize("T", [2, 512])  # decode, grouped
def test_close_to_the_unquantized_layer(T):
    """The int8 layer approximates the bf16 layer it was quantized from. Rounding to the nearest of 127 steps of
    amax / 127 per row errs uniformly within half a step: rms error amax / (127 * sqrt(12)), 0.8% of a gaussian
    row's rms at amax ~ 3.4 sigma (H = 1024); the two GEMMs and the gated product take the layer to ~1.3% in fp32
    (measured on the reference), plus the bf16 roundings of both layers."""
    p = make_problem(T, 8, 2, 1024, 512)
    unquantized = poison_(torch.empty_like(p["x"]))
    jitmoe.cutlass_fused_moe(p["x"], p["ids"], p["weights"], p["w1"], p["w2"], BF16, None, output=unquantized)
    err = rel_error(run(p), unquantized)
    assert 5e-3 < err < 3e-2  # never exact: the weights really are int8


def test_forced_sm90_kernel_is_rejected():
    if not on_hopper():
        pytest.skip("the sm90 kernel needs an sm_90a GPU")
    p = make_problem(1000, 8, 2, 256, 256)
    with fm.force_kernel("sm90"), pytest.raises(NotImplementedError, match="INT8 weight-only"):
        run(p)


# -- the sm90ws GEMMs alone against their exact contract (gemm1_reference / gemm2_reference) ------------------------
# Shapes: direct rows with the second warpgroup idle (few rows per expert); gathered rows with partial last blocks;
# K and N tails (H, I multiples of 16, not of 64); a plain activation (one B half, the wide GEMM2 tile); K and N tails
# again with direct rows (GEMM1 K = 1040: 17 k-tiles, the last one 16 wide; GEMM2 K = 80).
GEMM_SHAPES = [(40, 8, 2, 512, 256, "Swiglu"), (900, 8, 2, 1040, 272, "Swiglu"), (700, 4, 1, 256, 1024, "Gelu"),
               (40, 8, 2, 1040, 80, "Swiglu")]


@pytest.mark.parametrize("dtype,scale_dtype", [(BF16, None), (FP16, torch.float32)])
@pytest.mark.parametrize("T,E,k,H,I,act", GEMM_SHAPES)
def test_sm90ws_gemms_match_their_contract(T, E, k, H, I, act, dtype, scale_dtype):
    needs_hopper("sm90ws")
    p = make_problem(T, E, k, H, I, dtype, act=act, bias=True, scale_dtype=scale_dtype)
    gated = act in GATED_ACTIVATIONS
    cfg1 = mg.select_config(T * k, E, I, H, "90a", dtype, gated=gated, weight="s8")
    cfg2 = mg.select_config(T * k, E, H, I, "90a", dtype, gated=False, weight="s8")
    assert cfg1.kernel == cfg2.kernel == "sm90ws" and cfg1.block_m == cfg2.block_m
    outputs = permute.empty_align_outputs(T * k, E, cfg1.block_m, p["x"].device)
    permute.align_into(p["ids"], E, cfg1.block_m, 0, outputs)
    sorted_ids, block_expert, num_padded = outputs[:3]
    inter = poison_(torch.empty(sorted_ids.shape[0], I, dtype=dtype, device=DEV))
    mg.launch_gemm1(p["x"], p["fc1"], sorted_ids, block_expert, num_padded, out=inter, topk=k, activation=act,
                    fc1_bias=p["b1"], config=cfg1, w_scale=p["s1"])
    expected = torch.full_like(inter, float("nan"))
    mg.gemm1_reference(p["x"], p["fc1"], sorted_ids, block_expert, num_padded, expected, k, act, p["b1"], None, None,
                       None, cfg1.block_m, w_scale=p["s1"])
    real = ~expected[:, 0].isnan()
    assert real.sum().item() == T * k
    assert rel_error(inter[real], expected[real]) <= 4e-3  # both round the same fp32 values to 16 bits
    slot_weights = p["weights"].reshape(-1).contiguous()
    out = poison_(torch.empty(T * k, H, dtype=dtype, device=DEV))
    mg.launch_gemm2(expected.nan_to_num(), p["fc2"], sorted_ids, block_expert, num_padded, slot_weights, out=out,
                    fc2_bias=p["b2"], config=cfg2, w_scale=p["s2"])
    expected2 = torch.empty_like(out, dtype=torch.float32)
    mg.gemm2_reference(expected.nan_to_num(), p["fc2"], sorted_ids, block_expert, num_padded, slot_weights,
                       expected2, p["b2"], cfg2.block_m, w_scale=p["s2"])
    assert rel_error(out, expected2) <= 4e-3


def test_sm90ws_and_sm80_agree():
    needs_hopper("sm90ws")
    p = make_problem(1500, 16, 4, 2048, 768, bias=True)
    with fm.force_kernel("sm90ws"):
        hopper = run(p).clone()
    with fm.force_kernel("sm80"):
        ampere = run(p)
    ref = reference(p)
    assert rel_error(hopper, ref) <= TOL and rel_error(ampere, ref) <= TOL
    assert rel_error(hopper, ampere.float()) <= TOL


@pytest.mark.parametrize("kernel", ["sm90ws", "sm80"])
def test_two_runs_are_bitwise_equal(kernel):
    needs_hopper(kernel)
    p = make_problem(1000, 16, 4, 1024, 512, bias=True)
    with fm.force_kernel(kernel):
        first = run(p).clone()
        assert torch.equal(first, run(p))
    assert rel_error(first, reference(p)) <= TOL


@pytest.mark.parametrize("tokens", [36, 2048])  # 9 and 512 rows per expert
def test_nn_module_quantized_on_cuda(tokens):
    layer = jitmoe.nn.FusedMoE(256, 512, 8, 2, renormalize=True).to(DEV, BF16).quantize_int8_()
    x = torch.randn(tokens, 256, device=DEV, dtype=BF16)
    with torch.no_grad():
        got = layer(x)
        weights, ids = layer.route(x)  # the same routing, then the fp32 reference with the module's int8 experts
        expected = fused_moe_reference(x, ids, weights, layer.w13, layer.w2, fc1_weight_scales=layer.w13_scale,
                                       fc2_weight_scales=layer.w2_scale, out_dtype=torch.float32)
    assert layer.w13.dtype == torch.int8 and layer.w13_scale.dtype == BF16
    assert rel_error(got, expected) <= TOL
