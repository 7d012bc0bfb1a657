"""cutlass_fused_moe on the GPU against the fp32 reference, on every GEMM kernel the device can run (on an H100:
the SM90 kernels and, forced, the SM80 ones). Outputs are poisoned (NaN) before every run."""
import contextlib
import math

import pytest
import torch

import jitmoe
import jitmoe.nn
from jitmoe.ops import fused_moe as fm
from jitmoe.ops import moe_gemm, routing
from jitmoe.reference.moe import GATED_ACTIVATIONS, fused_moe_reference
from jitmoe.testing import poison_, rel_error

pytestmark = pytest.mark.gpu
TOL = 1e-2
BF16, FP16 = torch.bfloat16, torch.float16


def _kernels():
    if not torch.cuda.is_available():
        return ["sm80"]
    return [*moe_gemm.kernels_for_arch(fm._device_arch(torch.cuda.current_device())), fm.DECODE]


DECODE_MAX_SLOTS = 4096  # the decode path streams every slot's weights: larger forced problems only cost time


KERNELS = _kernels()


def on_kernel(kernel):
    return fm.force_kernel(kernel) if kernel else contextlib.nullcontext()


def make_problem(T, E, k, H, I, dtype, act="Swiglu", bias=False, distinct=True, x_scale=1.0):
    dev = "cuda"
    rows = 2 * I if act in GATED_ACTIVATIONS else I
    x = (torch.randn(T, H, device=dev) * x_scale).to(dtype)
    if distinct:
        ids = torch.rand(T, E, device=dev).argsort(dim=1)[:, :k].int().contiguous()
    else:
        ids = torch.randint(0, E, (T, k), device=dev, dtype=torch.int32)
    scales = torch.softmax(torch.randn(T, k, device=dev), dim=-1)
    fc1 = torch.randn(E, rows, H, device=dev, dtype=dtype).mul_(1 / math.sqrt(H))
    fc2 = torch.randn(E, H, I, device=dev, dtype=dtype).mul_(1 / math.sqrt(I))
    b1 = torch.randn(E, rows, device=dev, dtype=dtype).mul_(0.1) if bias else None
    b2 = torch.randn(E, H, device=dev, dtype=dtype).mul_(0.1) if bias else None
    return dict(x=x, ids=ids, scales=scales, fc1=fc1, fc2=fc2, b1=b1, b2=b2)


def run(p, kernel, output=None, **kw):
    """One call with a freshly poisoned output; returns it (checking it is the list's element 0)."""
    if kernel == fm.DECODE and p["ids"].numel() > DECODE_MAX_SLOTS:
        pytest.skip(f"the decode path is for few tokens (forced tests run it up to {DECODE_MAX_SLOTS} slots)")
    output = poison_(torch.empty_like(p["x"])) if output is None else poison_(output)
    with on_kernel(kernel):
        res = jitmoe.cutlass_fused_moe(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], p["x"].dtype, None,
                                       fc1_expert_biases=p["b1"], fc2_expert_biases=p["b2"], output=output, **kw)
    assert isinstance(res, list) and res[0] is output
    return output


def reference(p, **kw):
    return fused_moe_reference(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], fc1_expert_biases=p["b1"],
                               fc2_expert_biases=p["b2"], out_dtype=torch.float32, **kw)


SHAPES = [  # (T, E, k, H, I, distinct ids per token)
    (1, 2, 2, 128, 128, True), (2, 8, 1, 256, 256, True), (16, 64, 4, 1024, 768, True),
    (127, 128, 8, 768, 1408, True), (127, 8, 4, 256, 256, False), (1024, 256, 8, 2048, 768, True),
    (1, 256, 8, 2048, 1408, True), (127, 2, 1, 128, 2048, True), (8192, 8, 2, 1024, 1408, True),
    (8192, 64, 8, 2048, 1024, True),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("T,E,k,H,I,distinct", SHAPES)
def test_matches_reference(kernel, dtype, T, E, k, H, I, distinct):
    p = make_problem(T, E, k, H, I, dtype, distinct=distinct)
    assert rel_error(run(p, kernel), reference(p)) <= TOL


ACTIVATION_CASES = [  # (activation, swiglu params to pass, input scale: larger inputs reach the clamps)
    ("Gelu", (), 1.0), ("Relu", (), 1.0), ("Silu", (), 1.0), ("Swiglu", (), 1.0), ("Geglu", (), 1.0),
    ("SwigluBias", ("alpha", "beta", "limit"), 3.0), ("SwigluBias", (), 1.0), ("Relu2", (), 1.0),
    ("SwigluStep", (), 6.0), ("SwigluStep", ("limit",), 3.0), ("GegluTanh", (), 1.0), ("Identity", (), 1.0),
    ("Situ", (), 3.0), ("Swiglu", ("alpha",), 1.0),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("act,params,x_scale", ACTIVATION_CASES)
def test_every_activation(kernel, act, params, x_scale):
    T, E, k, H, I = 64, 8, 2, 256, 256
    p = make_problem(T, E, k, H, I, BF16, act=act, x_scale=x_scale)
    values = {"alpha": torch.rand(E, device="cuda") + 0.5, "beta": torch.randn(E, device="cuda"),
              "limit": torch.rand(E, device="cuda") + 0.5}
    kw = {f"swiglu_{name}": values[name] for name in params}
    out = run(p, kernel, activation_type=fm.ActivationType[act], **kw)
    assert rel_error(out, reference(p, activation=act, **kw)) <= TOL


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("act", ["Swiglu", "Relu2"])
def test_biases(kernel, dtype, act):
    p = make_problem(33, 8, 2, 256, 768, dtype, act=act, bias=True)
    out = run(p, kernel, activation_type=fm.ActivationType[act])
    assert rel_error(out, reference(p, activation=act)) <= TOL
    # on TP ranks other than 0 the fc2 bias is left out (the shards' outputs are summed)
    out = run(p, kernel, activation_type=fm.ActivationType[act], tp_size=2, tp_rank=1)
    assert rel_error(out, reference(p, activation=act, tp_rank=1)) <= TOL


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("k", [3, 6, 12, 16])
def test_decode_splits_any_number_of_choices(T, k):
    """The decode GEMM2 splits a token's choices over a power-of-two number of warps: counts that leave some warps
    fewer choices (3, 6, 12) or give each several (16), with biases, H not a multiple of a block's columns and I
    shorter than a warp's 32 chunks."""
    p = make_problem(T, 32, k, 200, 96, BF16, bias=True)
    assert rel_error(run(p, fm.DECODE), reference(p)) <= TOL


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8)])
def test_expert_parallel_four_ranks_sum_to_full(kernel, E, k):
    ep = 4
    p = make_problem(127, E, k, 256, 512, BF16, bias=True)
    total = torch.zeros(p["x"].shape, dtype=torch.float32, device="cuda")
    for rank in range(ep):
        local = slice(rank * E // ep, (rank + 1) * E // ep)
        shard = dict(p, **{n: p[n][local].contiguous() for n in ("fc1", "fc2", "b1", "b2")})
        out = run(shard, kernel, ep_size=ep, ep_rank=rank)
        assert rel_error(out, reference(shard, ep_size=ep, ep_rank=rank)) <= TOL
        no_local = ~((p["ids"] >= local.start) & (p["ids"] < local.stop)).any(dim=1)
        assert torch.all(out[no_local] == 0)
        total += out.float()
    assert rel_error(total, reference(p)) <= TOL


def _tp_shard(p, rank, size):
    inter = p["fc2"].shape[2]
    part = slice(rank * inter // size, (rank + 1) * inter // size)
    up, gate = p["fc1"].chunk(2, dim=1)
    b_up, b_gate = p["b1"].chunk(2, dim=1)
    return dict(p, fc1=torch.cat([up[:, part], gate[:, part]], dim=1).contiguous(),
                fc2=p["fc2"][:, :, part].contiguous(),
                b1=torch.cat([b_up[:, part], b_gate[:, part]], dim=1).contiguous())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_sum_to_full(kernel, tp):
    p = make_problem(64, 8, 2, 256, 1024, BF16, bias=True)
    total = torch.zeros(p["x"].shape, dtype=torch.float32, device="cuda")
    for rank in range(tp):
        shard = _tp_shard(p, rank, tp)
        out = run(shard, kernel, tp_size=tp, tp_rank=rank)
        assert rel_error(out, reference(shard, tp_rank=rank)) <= TOL
        total += out.float()
    assert rel_error(total, reference(p)) <= TOL


def check_graph_replay(kernel, T, E, k, H, I, k_splits=None):
    """Capture one call (modules loaded outside the capture), then replay it twice on fresh inputs."""
    p = make_problem(T, E, k, H, I, BF16, bias=True)
    output = torch.empty_like(p["x"])
    with fm.force_split_k(k_splits):
        run(p, kernel, output=output)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with on_kernel(kernel), torch.cuda.graph(graph):
            jitmoe.cutlass_fused_moe(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], BF16, None,
                                     fc1_expert_biases=p["b1"], fc2_expert_biases=p["b2"], output=output)
    for _ in range(2):
        fresh = make_problem(T, E, k, H, I, BF16)
        for name in ("x", "ids", "scales"):
            p[name].copy_(fresh[name])
        poison_(output)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(output, reference(p)) <= TOL


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T,k", [(1, 1), (3, 1), (127, 4), (1024, 8)])
def test_cuda_graph_capture_and_replay(kernel, T, k):
    check_graph_replay(kernel, T, 16, k, 256, 512)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("T,E,k,act", [(1, 8, 2, "Swiglu"), (5, 8, 2, "SwigluBias"), (40, 4, 1, "Gelu"),
                                       (300, 16, 4, "Swiglu")])
def test_forced_split_k_matches_reference_and_is_deterministic(kernel, k_splits, T, E, k, act):
    if kernel not in moe_gemm.SPLIT_K_KERNELS:
        pytest.skip(f"the {kernel} kernel does not split K")
    p = make_problem(T, E, k, 1032, 776, BF16, act=act, bias=True)  # K and N tails; 17 / 13 k tiles of 64
    with fm.force_split_k(k_splits):
        first = run(p, kernel, activation_type=fm.ActivationType[act]).clone()
        second = run(p, kernel, activation_type=fm.ActivationType[act])
    assert rel_error(first, reference(p, activation=act)) <= TOL
    assert torch.equal(first, second)


@pytest.mark.parametrize("kernel", KERNELS)
def test_split_k_graph_capture_and_replay(kernel):
    if kernel not in moe_gemm.SPLIT_K_KERNELS:
        pytest.skip(f"the {kernel} kernel does not split K")
    check_graph_replay(kernel, 2, 8, 2, 2048, 1024, k_splits=4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_two_runs_are_bitwise_equal_in_both_finalize_modes(kernel):
    p = make_problem(1024, 64, 8, 1024, 768, BF16, bias=True)
    runs = [run(p, kernel, use_fused_finalize=mode) for mode in (False, False, True, True)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert rel_error(runs[0], reference(p)) <= TOL


@pytest.mark.parametrize("kernel", KERNELS)
def test_programmatic_dependent_launch_gives_the_serial_bits(kernel, monkeypatch):
    """Three layers back to back, each reading the last one's output, with PDL (the default on SM90) and with
    JITMOE_PDL=0: every kernel waits for the one before it, so the bits are the same."""
    T = 5 if kernel == fm.DECODE else 300
    p = make_problem(T, 16, 4, 512, 256, BF16, bias=True)

    def three_layers():
        x = p["x"]
        for _ in range(3):
            out = poison_(torch.empty_like(x))
            with on_kernel(kernel):
                jitmoe.cutlass_fused_moe(x, p["ids"], p["scales"], p["fc1"], p["fc2"], BF16, None,
                                         fc1_expert_biases=p["b1"], fc2_expert_biases=p["b2"], output=out)
            x = out
        return x

    monkeypatch.setenv("JITMOE_PDL", "0")
    serial = three_layers()
    monkeypatch.delenv("JITMOE_PDL")
    overlapped = three_layers()
    assert torch.isfinite(serial).all()
    assert torch.equal(serial, overlapped)


@pytest.mark.skipif("sm90ws" not in KERNELS, reason="per-block counters are the sm90ws kernel's")
@pytest.mark.parametrize("T,E,k", [(16, 64, 8), (64, 128, 8), (40, 16, 2)])
def test_gemm2_on_gemm1s_counted_blocks_gives_the_serial_bits(T, E, k, monkeypatch):
    """Few rows per expert, so GEMM1 ends in a partial wave that GEMM2 overlaps (per-block counters, PDL): three
    layers back to back give the bits of JITMOE_BLOCK_DONE=0 and of JITMOE_PDL=0, and match the reference."""
    p = make_problem(T, E, k, 1024, 512, BF16, bias=True)
    cfg1, cfg2 = fm._gemm_configs(T * k, E, 1024, 512, p["x"], "Swiglu", "", 0)
    sms = fm._device_sms(p["x"].device.index)
    assert moe_gemm.overlaps_gemm2(cfg1, cfg2, T * k, E, 512, sms), (cfg1, cfg2)

    def three_layers():
        x = p["x"]
        for _ in range(3):
            out = poison_(torch.empty_like(x))
            jitmoe.cutlass_fused_moe(x, p["ids"], p["scales"], p["fc1"], p["fc2"], BF16, None,
                                     fc1_expert_biases=p["b1"], fc2_expert_biases=p["b2"], output=out)
            x = out
        return x

    counted = three_layers()
    monkeypatch.setenv("JITMOE_BLOCK_DONE", "0")
    assert not moe_gemm.overlaps_gemm2(cfg1, cfg2, T * k, E, 512, sms)
    assert torch.equal(three_layers(), counted)
    monkeypatch.setenv("JITMOE_PDL", "0")
    assert torch.equal(three_layers(), counted)
    assert torch.isfinite(counted).all()
    assert rel_error(run(p, ""), reference(p)) <= TOL


@pytest.mark.skipif("sm80" not in KERNELS, reason="needs the sm80 kernel")
def test_only_sm90ws_takes_block_counters():
    p = make_problem(8, 4, 2, 128, 128, BF16)
    routing = fm._permute.moe_align(p["ids"], 4, 64)
    inter = torch.empty(routing[0].numel(), 128, dtype=BF16, device="cuda")
    counters = torch.zeros(routing[1].numel(), dtype=torch.int32, device="cuda")
    cfg = moe_gemm.default_configs("sm80", "80")[1]
    assert cfg.block_m == 64
    with pytest.raises(ValueError, match="block_done"):
        moe_gemm.launch_gemm1(p["x"], p["fc1"], *routing[:3], out=inter, topk=2, activation="Swiglu", fc1_bias=None,
                              config=cfg, block_done=counters)


@pytest.mark.parametrize("kernel", KERNELS)
def test_out_of_range_ids_contribute_zero(kernel):
    p = make_problem(127, 8, 4, 256, 256, BF16)
    bad = torch.rand(p["ids"].shape, device="cuda") < 0.2
    p["ids"] = torch.where(bad, torch.where(torch.rand_like(p["scales"]) < 0.5, -3, 8), p["ids"]).int()
    assert rel_error(run(p, kernel), reference(p)) <= TOL  # the reference skips ids that are not local


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 2])
def test_unaligned_output_buffer(kernel, k):
    p = make_problem(17, 8, k, 256, 256, FP16)
    output = torch.empty(17 * 256 + 1, dtype=FP16, device="cuda")[1:].view(17, 256)
    assert rel_error(run(p, kernel, output=output), reference(p)) <= TOL


def test_empty_batch_launches_nothing():
    p = make_problem(0, 8, 2, 128, 128, BF16)
    out = torch.empty(0, 128, dtype=BF16, device="cuda")
    assert jitmoe.cutlass_fused_moe(p["x"], p["ids"], p["scales"], p["fc1"], p["fc2"], BF16, None,
                                    output=out)[0] is out


def test_device_errors():
    p = make_problem(8, 8, 2, 128, 128, BF16)
    call = lambda **kw: jitmoe.cutlass_fused_moe(**{**dict(  # noqa: E731
        input=p["x"], token_selected_experts=p["ids"], token_final_scales=p["scales"], fc1_expert_weights=p["fc1"],
        fc2_expert_weights=p["fc2"], output_dtype=BF16, quant_scales=None), **kw})
    with pytest.raises(ValueError, match="token_selected_experts"):
        call(token_selected_experts=p["ids"].cpu())
    with pytest.raises(ValueError, match="output"):
        call(output=torch.empty(8, 128, dtype=BF16))
    with pytest.raises(ValueError, match="input"):
        call(input=torch.empty(8 * 128 + 1, dtype=BF16, device="cuda")[1:].view(8, 128))
    with pytest.raises(ValueError, match="workspace_buffer"):
        call(workspace_buffer=torch.empty(64, dtype=torch.uint8))


@pytest.mark.skipif(not hasattr(routing, "topk_softmax"), reason="jitmoe.topk_softmax is not written yet")
def test_nn_module_on_cuda():
    layer = jitmoe.nn.FusedMoE(256, 512, 8, 2, renormalize=True).to("cuda", BF16)
    x = torch.randn(4, 9, 256, device="cuda", dtype=BF16)
    with torch.no_grad():
        got = layer(x)
        weights, ids = layer.route(x.reshape(-1, 256))  # the same routing, then the fp32 reference experts
        expected = fused_moe_reference(x.reshape(-1, 256), ids, weights, layer.w13, layer.w2,
                                       out_dtype=torch.float32)
    assert got.shape == x.shape and rel_error(got.reshape(-1, 256), expected) <= TOL
