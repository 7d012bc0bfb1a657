"""INT8 weight-only per channel on the CPU: the quantizer, the layer's reference path, every argument error, the
kernel specs, tile fits and path rules, the int8 conversions' arithmetic, prewarm, and an nvcc -c of both int8
templates (no GPU needed); the kernels' numerics are in tests/gpu/test_fused_moe_int8.py."""
import re
import struct

import pytest
import torch

import jitmoe
from jitmoe import quant
from jitmoe.jit import UnsupportedSpecError, compile_cuda_sources
from jitmoe.jit.arch import find_nvcc
from jitmoe.ops import prewarm_registry
from jitmoe.ops import fused_moe as fm
from jitmoe.ops import moe_decode as dec
from jitmoe.ops import moe_gemm as mg
from jitmoe.reference.moe import fused_moe_reference


def make_problem(T=5, E=4, k=2, H=64, I=32, dtype=torch.bfloat16, scale_dtype=None, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * I if gated else I
    w1 = torch.randn(E, rows, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    q1, s1 = quant.quantize_int8_per_channel(w1.to(dtype), scale_dtype)
    q2, s2 = quant.quantize_int8_per_channel(w2.to(dtype), scale_dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].int().contiguous()
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return dict(x=x, ids=ids, weights=weights, q1=q1, q2=q2, s1=s1, s2=s2, w1=w1, w2=w2, dtype=dtype)


def run(p, **kw):
    args = dict(quant_scales=[p["s1"], p["s2"]], use_int8_woq_per_channel=True)
    args.update(kw)
    scales = args.pop("quant_scales")
    return jitmoe.cutlass_fused_moe(args.pop("x", p["x"]), p["ids"], p["weights"], args.pop("fc1", p["q1"]),
                                    args.pop("fc2", p["q2"]), args.pop("output_dtype", p["dtype"]), scales,
                                    **args)[0]


# -- the quantizer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantizer_round_trips_within_half_a_step(dtype):
    w = torch.randn(3, 16, 40).to(dtype)
    q, s = quant.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (3, 16) and s.dtype == dtype
    assert q.abs().max() <= 127 and (q.abs() == 127).any(dim=-1).all()  # each row's amax lands on 127
    err = (q.float() * s.float()[..., None] - w.float()).abs()
    assert (err <= s.float()[..., None] * 0.5 + 1e-6).all()


def test_quantizer_scale_dtype_zero_rows_and_2d():
    w = torch.randn(8, 32)
    w[3] = 0
    q, s = quant.quantize_int8_per_channel(w, torch.bfloat16)
    assert s.dtype == torch.bfloat16 and s.shape == (8,) and (q[3] == 0).all() and s[3] > 0
    # the int8 values come from the rounded (bf16) scale, so dequantization uses exactly what the kernels read
    assert torch.equal(q[0], torch.round(w[0] / s[0].float()).clamp(-127, 127).to(torch.int8))


def test_quantizer_keeps_small_fp16_rows():
    w = torch.randn(4, 64).half() * 1e-4  # amax ~3e-4: below 127 x fp16's smallest normal
    q, s = quant.quantize_int8_per_channel(w)
    assert s.dtype == torch.float16 and (q.abs().amax(dim=-1) >= 120).all()
    assert ((q.float() * s.float()[:, None] - w.float()).norm() / w.float().norm()) < 2e-2


@pytest.mark.parametrize("bad, error", [(dict(w=torch.ones(4, 4, dtype=torch.int32)), TypeError),
                                        (dict(w=torch.ones(4)), ValueError),
                                        (dict(w=torch.ones(4, 4), scale_dtype=torch.int8), TypeError)])
def test_quantizer_errors(bad, error):
    with pytest.raises(error):
        quant.quantize_int8_per_channel(**bad)


# -- the layer on the CPU (the reference math) ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, scale_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32)])
def test_cpu_layer_is_the_layer_of_the_dequantized_weights(dtype, scale_dtype):
    p = make_problem(dtype=dtype, scale_dtype=scale_dtype)
    out = run(p)
    deq1 = p["q1"].float() * p["s1"].float()[..., None]
    deq2 = p["q2"].float() * p["s2"].float()[..., None]
    ref = fused_moe_reference(p["x"], p["ids"], p["weights"], deq1, deq2, out_dtype=torch.float32)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    # and close to the unquantized layer: per-channel int8 keeps about 2 decimal digits
    exact = fused_moe_reference(p["x"], p["ids"], p["weights"], p["w1"], p["w2"], out_dtype=torch.float32)
    assert (out.float() - exact).norm() / exact.norm() < 3e-2


def test_cpu_layer_with_biases_ep_and_a_non_gated_activation():
    p = make_problem(gated=False, T=6, E=4)
    b1, b2 = torch.randn(4, 32).bfloat16(), torch.randn(4, 64).bfloat16()
    halves = []
    for rank in range(2):
        lo = 2 * rank
        halves.append(jitmoe.cutlass_fused_moe(
            p["x"], p["ids"], p["weights"], p["q1"][lo:lo + 2], p["q2"][lo:lo + 2], torch.bfloat16,
            [p["s1"][lo:lo + 2], p["s2"][lo:lo + 2]], fc1_expert_biases=b1[lo:lo + 2], fc2_expert_biases=b2[lo:lo + 2],
            ep_size=2, ep_rank=rank, activation_type=fm.ActivationType.Relu2, use_int8_woq_per_channel=True)[0])
    full = run(p, fc1_expert_biases=b1, fc2_expert_biases=b2, activation_type=fm.ActivationType.Relu2)
    torch.testing.assert_close(halves[0].float() + halves[1].float(), full.float(), rtol=2e-2, atol=2e-2)


# -- errors -----------------------------------------------------------------------------------------------------------
def _errors():
    p = make_problem()
    fp8 = torch.float8_e4m3fn
    return p, [
        (dict(use_int8_woq_per_channel=False), TypeError, "fc1_expert_weights: int8 weights need"),
        (dict(use_int8_woq_per_channel=1), TypeError, "use_int8_woq_per_channel: expected a bool"),
        (dict(fc1=p["w1"].bfloat16()), TypeError, "fc1_expert_weights: expected int8 weights"),
        (dict(fc2=p["w2"].bfloat16()), TypeError, "fc2_expert_weights: expected int8 weights"),
        (dict(quant_scales=None), ValueError, "quant_scales: expected 2 tensors"),
        (dict(quant_scales=[p["s1"]]), ValueError, "quant_scales: expected 2 tensors"),
        (dict(quant_scales=(p["s1"], p["s2"], p["s2"])), ValueError, "expected 2 tensors"),
        (dict(quant_scales=p["s1"]), TypeError, "quant_scales: expected a list"),
        (dict(quant_scales=[p["s1"][:, :8].contiguous(), p["s2"]]), ValueError,
         r"quant_scales\[0\] \(fc1 scales\): expected shape"),
        (dict(quant_scales=[p["s1"], p["s2"][:2]]), ValueError, r"quant_scales\[1\] \(fc2 scales\): expected shape"),
        (dict(quant_scales=[p["s1"].half(), p["s2"].half()]), TypeError, "expected dtype float32/bfloat16"),
        (dict(quant_scales=[p["s1"], p["s2"].float()]), TypeError, "both scales in one dtype"),
        (dict(quant_scales=[p["s1"].reshape(-1), p["s2"]]), ValueError, "expected a 2-D tensor"),
        (dict(x=p["x"].to(fp8), output_dtype=torch.bfloat16), TypeError, "input: expected dtype bfloat16/float16"),
        (dict(output_dtype=torch.float16), TypeError, "output_dtype"),
        (dict(x=p["x"][:, :56].contiguous(), fc1=p["q1"][:, :, :56].contiguous(),
              fc2=p["q2"][:, :56].contiguous(), quant_scales=[p["s1"], p["s2"][:, :56].contiguous()]),
         ValueError, "multiple of 16"),
    ]


@pytest.mark.parametrize("case", range(len(_errors()[1])))
def test_argument_errors_name_the_argument(case):
    p, cases = _errors()
    kw, error, message = cases[case]
    with pytest.raises(error, match=message):
        run(p, **kw)


# -- specs, tiles and the path rules ----------------------------------------------------------------------------------
def test_gemm_specs_take_int8_weights_on_sm90ws_and_sm80():
    cfg = mg.select_config(4096, 8, 1024, 1024, "90a", "bf16", weight="s8")  # sm_90a: the persistent TMA kernel
    assert (cfg.kernel, cfg.block_k, cfg.cluster_m) == ("sm90ws", 64, 1)
    assert mg.select_config(4096, 8, 1024, 1024, "90a", "bf16").cluster_m == 2  # 16-bit gated GEMM1 multicasts
    spec = mg.gemm_spec(cfg, "bf16", "gemm1", "Swiglu", ("90a",), weight="s8")
    assert dict(spec.params)["weight"] == "s8" and dict(spec.params)["operand"] == "bf16"
    assert dict(mg.gemm_spec(cfg, "bf16", "gemm1", "Swiglu", ("90a",)).params)["weight"] == "bf16"
    fp8 = mg.fp8_config(mg.select_config(4096, 8, 1024, 1024, "90a", "bf16"))
    assert dict(mg.gemm_spec(fp8, "bf16", "gemm1", "Swiglu", ("90a",), "e4m3").params)["weight"] == "e4m3"
    sm80 = mg.select_config(4096, 8, 1024, 1024, "80", "bf16", weight="s8")
    assert sm80.kernel == "sm80" and sm80.stages >= 3
    assert dict(mg.gemm_spec(sm80, "bf16", "gemm1", "Swiglu", ("80",), weight="s8").params)["weight"] == "s8"
    # Few rows per expert of small experts take sm80 (Qwen3-30B at 1 and 8 rows); more rows, or larger experts, sm90ws.
    for slots, experts, n, k, kernel in ((128, 128, 768, 2048, "sm80"), (1024, 128, 2048, 768, "sm80"),
                                         (2048, 128, 768, 2048, "sm90ws"), (16, 8, 14336, 4096, "sm90ws")):
        assert mg.select_config(slots, experts, n, k, "90a", "bf16", weight="s8").kernel == kernel
    # A forced split takes the kernel that splits K.
    assert mg.select_config(64, 8, 1024, 1024, "90a", "bf16", weight="s8", k_splits=2).kernel == "sm80"
    for bad in (mg.GemmConfig("sm90ws", 128, 128, 64, 4, cluster_m=2), mg.GemmConfig("sm90ws", 128, 128, 128, 4),
                mg.GemmConfig("sm90", 128, 128, 64, 4)):
        with pytest.raises(UnsupportedSpecError, match="int8 weights"):
            mg.gemm_spec(bad, "bf16", "gemm1", "Swiglu", ("90a",), weight="s8")
    with pytest.raises(UnsupportedSpecError, match="int8 weights"):
        mg.gemm_spec(cfg, "bf16", "gemm1", "Swiglu", ("90a",), "e4m3", weight="s8")
    with pytest.raises(UnsupportedSpecError, match="3 stages"):
        mg.gemm_spec(mg.GemmConfig("sm80", 64, 128, 32, 2), "bf16", "gemm2", "Identity", ("80",), weight="s8")
    with pytest.raises(ValueError, match="with int8 weights"):
        mg.select_config(4096, 8, 1024, 1024, "90a", "bf16", kernel="sm90", weight="s8")
    with pytest.raises(ValueError, match="weight"):
        mg.select_config(4096, 8, 1024, 1024, "90a", "bf16", weight="s4")


@pytest.mark.parametrize("arch", ["80", "86", "90a"])
def test_int8_tiles_fit_every_arch(arch):
    for gated in (True, False):
        for cfg in mg.default_configs("sm80", arch, gated, s8=True):
            assert cfg.stages >= 3 and mg.sm80_tile_problem(cfg, gated, arch, s8=True) is None, cfg
            assert mg.sm80_smem_bytes(cfg, gated, s8=True) <= mg.smem_limit(arch)
    if arch == "90a":  # the sm90ws tiles: int8 ring, two 16-bit B slots, clusters of one
        for gated in (True, False):
            configs = mg.default_configs("sm90ws", arch, gated, s8=True)
            assert configs and all(c.cluster_m == 1 and c.block_k == 64 for c in configs), configs
            assert all(mg.sm90ws_smem_bytes(c, gated, s8=True) <= mg.smem_limit(arch) for c in configs)
        # The kernel's plan (Config::kSmemBytes): ring 4 x (16 KiB of A + 16 KiB of int8 B), two 32 KiB B slots,
        # the 32 KiB staging tile, 1 KiB of alignment, two barriers per stage.
        gated_tile = mg.default_configs("sm90ws", arch, True, s8=True)[0]
        assert (gated_tile.block_n, gated_tile.stages) == (128, 4)
        assert mg.sm90ws_smem_bytes(gated_tile, True, s8=True) == 4 * 32768 + 2 * 32768 + 32768 + 1024 + 64


def test_int8_weights_take_the_16_bit_decode_rule_with_16_element_rows():
    assert dec.use_decode(8, 2, 64, 1024, 512, 2, 1) and not dec.use_decode(16, 2, 64, 1024, 512, 2, 1)
    assert dec.fits_decode(1, 8, 1024, 512, 2, 1) and not dec.fits_decode(1, 8, 1032, 512, 2, 1)
    assert dec.fits_decode(1, 8, 1032, 512, 2)  # 16-bit weights: 8-element rows suffice


def test_decode_specs_and_prewarm():
    spec = dec.decode_spec("fp16", "Swiglu", ("80",), None, "s8")
    assert dict(spec.params) == {"dtype": "fp16", "operand": "fp16", "weight": "s8", "act": "Swiglu"}
    with pytest.raises(ValueError, match="weight"):
        dec.decode_spec("bf16", "Swiglu", ("90a",), "e4m3", "s8")
    specs = prewarm_registry()["fused_moe_decode"](["int8"], [8], ["80", "90a"])
    assert len(specs) == len(dec.ACTIVATIONS) and all(dict(s.params)["weight"] == "s8" for s in specs)
    gemms = prewarm_registry()["fused_moe"](["int8"], [8], ["90a"])
    assert gemms and all(dict(s.params)["weight"] == "s8" for s in gemms)
    assert {dict(s.params)["kernel"] for s in gemms} == {"sm90ws", "sm80"}  # the heuristic's and force_kernel's
    gemms80 = prewarm_registry()["fused_moe"](["int8"], [8], ["80"])
    assert gemms80 and {dict(s.params)["kernel"] for s in gemms80} == {"sm80"}


def test_the_forced_sm90_kernel_is_rejected_before_any_launch(monkeypatch):
    monkeypatch.setattr(fm, "_device_arch", lambda index: "90a")
    monkeypatch.setattr(fm, "_device_sms", lambda index: 132)
    monkeypatch.setattr(fm._permute, "align_into", lambda *a, **k: pytest.fail("launched moe_align"))
    p = make_problem(T=64)
    with pytest.raises(NotImplementedError, match="INT8 weight-only on a forced kernel 'sm90'"):
        fm._run_cuda(torch.empty_like(p["x"]), p["x"], p["ids"], p["weights"].reshape(-1), p["q1"], p["q2"], None,
                     None, {}, "Swiglu", 0, "sm90", 0, int8=quant.Int8Scales(p["s1"], p["s2"]))


# -- the conversions' arithmetic (common/int8.cuh), emulated bit for bit -----------------------------------------------
def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def test_int8_magic_number_conversions_are_exact_for_every_byte():
    for b in range(-128, 128):
        u = (b & 0xFF) ^ 0x80  # the kernel's xor with kS8Bias
        assert _f32(0x4B000000 | u) - 8388736.0 == b  # fp32: 2^23 + u - (2^23 + 128)
        half = torch.tensor([0x6400 | u], dtype=torch.int16).view(torch.float16).float().item()
        assert half - 1152.0 == b  # fp16: 1024 + u - 1152, exact in fp16
        f_bits = struct.unpack("<I", struct.pack("<f", float(b)))[0]
        bf16 = torch.tensor([f_bits >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item()
        assert bf16 == b and f_bits & 0xFFFF == 0  # the upper half of fp32(b) is bf16(b), nothing dropped


# -- nvcc -c of both int8 templates -----------------------------------------------------------------------------------
def _spills(output: str) -> list[int]:
    return [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_int8_sm80_gemm_compiles_without_spills(tmp_path, monkeypatch):
    monkeypatch.delenv("JITMOE_DEBUG", raising=False)
    cfg = mg.select_config(4096, 8, 1024, 1024, "80", "bf16", weight="s8")
    results = compile_cuda_sources(mg.gemm_spec(cfg, "bf16", "gemm1", "Swiglu", ("80", "90a"), weight="s8"), tmp_path,
                                   ptxas_verbose=True)
    output = results[0].output
    assert "registers" in output and _spills(output) and not any(_spills(output)), output


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_int8_decode_template_compiles(tmp_path, monkeypatch):
    """sm_80 without spills; sm_90a's GEMM2 spills a few bytes at its 64-register cap (moe_decode.cuh)."""
    monkeypatch.delenv("JITMOE_DEBUG", raising=False)
    results = compile_cuda_sources(dec.decode_spec("bf16", "Swiglu", ("80",), None, "s8"), tmp_path,
                                   ptxas_verbose=True)
    output = results[0].output
    assert output.count("Compiling entry function") == 2 and not any(_spills(output)), output


@pytest.mark.parametrize("k_splits", [0, 2])
def test_cuda_pipeline_int8_plumbing_on_cpu_tensors(cpu_pipeline, k_splits):
    """_run_cuda's INT8 branch (sm90ws tiles for int8 weights, or sm80's with a split; per-channel scales to both
    GEMMs) on CPU tensors."""
    p = make_problem(T=40, E=4, k=2)
    b1, b2 = torch.randn(4, 64).bfloat16(), torch.randn(4, 64).bfloat16()
    output = torch.full(p["x"].shape, float("nan"), dtype=torch.bfloat16)
    fm._run_cuda(output, p["x"], p["ids"], p["weights"].reshape(-1), p["q1"], p["q2"], b1, b2, {}, "Swiglu", 0, "",
                 k_splits, int8=quant.Int8Scales(p["s1"], p["s2"]))
    ref = fused_moe_reference(p["x"], p["ids"], p["weights"], p["q1"], p["q2"], fc1_expert_biases=b1,
                              fc2_expert_biases=b2, out_dtype=torch.float32, fc1_weight_scales=p["s1"],
                              fc2_weight_scales=p["s2"])
    assert (output.float() - ref).norm() / ref.norm() < 1e-2
