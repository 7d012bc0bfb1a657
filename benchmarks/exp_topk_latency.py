"""Top-k latency experiment (issue 7): how prefill and decode latency of a MoE decoder grow with top-k.

A synthetic decoder stack with a Molmo-like MoE configuration (64 experts, hidden 2048, expert intermediate 1024,
4 layers, SDPA attention with a KV cache; random weights: latency does not depend on trained values) runs with its
MoE blocks either as a HF-style PyTorch sparse MoE block (softmax router, loop over the experts hit, as in OLMoE /
Mixtral) or as ``jitmoe.nn.FusedMoE`` built from the same weights. For every top-k the script sets ``top_k`` on every
block (1 <= k <= experts, else a clear error), verifies the change (blocks changed; width of the routing ids seen
by a dispatch probe during one forward), then times the prefill of a prompt and N single-token decode steps with
CUDA events around the stack. Output: JSON in the seed's shape (per implementation a list of
{top_k, prefill: {P50, P95, P99, mean, std, min, max}, decode: {...}} plus scaling and efficiency), a PNG, and a
markdown table. Times are in ms; decode is per token.

    python benchmarks/exp_topk_latency.py [--implementation torch|jitmoe|both] [--top-k-values 1,2,4,8,16,32]
                                          [--num-samples 50] [--tiny --device cpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import _common as common

DEFAULT_TOP_K = (1, 2, 4, 8, 16, 32)
VERIFY_TOKENS = 5  # tokens in the verification forward: an unusual count, so [T, k] tensors are easy to spot
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class StackConfig:
    layers: int = 4
    hidden: int = 2048
    heads: int = 16
    experts: int = 64
    intermediate: int = 1024
    top_k: int = 8
    vocab: int = 50304
    norm_topk_prob: bool = False  # OLMoE / Molmoe keep the raw softmax weights of the chosen experts


TINY = StackConfig(layers=2, hidden=64, heads=4, experts=8, intermediate=32, top_k=2, vocab=256)
TINY_RUN = {"prompt_len": 16, "decode_tokens": 3, "num_samples": 3, "warmup": 1}
FULL_RUN = {"prompt_len": 600, "decode_tokens": 10, "num_samples": 50, "warmup": 3}


# ----------------------------------------------------------------------------------------------- the model

class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, **factory)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """The HF sparse MoE block as OLMoE/Mixtral write it: softmax router in fp32, top-k, then a loop over the experts
    that received tokens (gather their rows, run the expert MLP, scale, index_add back)."""

    def __init__(self, cfg: StackConfig, **factory):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.experts, cfg.top_k, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden, cfg.experts, bias=False, **factory)
        self.experts = nn.ModuleList(ExpertMLP(cfg.hidden, cfg.intermediate, **factory) for _ in range(cfg.experts))

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, T]
        for expert in expert_mask.sum(dim=(1, 2)).nonzero().flatten().tolist():
            slot, token = torch.where(expert_mask[expert])
            out.index_add_(0, token, self.experts[expert](x[token]) * weights[token, slot, None])
        return out.reshape(hidden_states.shape), router_logits


class KVCache:
    """Per-layer keys/values [layers, 1, heads, max_len, head_dim], written at absolute positions."""

    def __init__(self, cfg: StackConfig, max_len: int, device, dtype):
        shape = (cfg.layers, 1, cfg.heads, max_len, cfg.hidden // cfg.heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        end = pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache: position {end} is past its length {self.k.shape[3]}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: StackConfig, **factory):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False, **factory)
        self.o_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False, **factory)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B,h,S,d]
        keys, values = cache.update(layer, pos, k, v)
        # Prefill starts at position 0, so the causal mask of a square block is right; one decode query sees all.
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=S > 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: StackConfig, **factory):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=1e-6, **factory)
        self.attn = Attention(cfg, **factory)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=1e-6, **factory)
        self.mlp = SparseMoeBlock(cfg, **factory)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, pos: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, layer, pos)
        out = self.mlp(self.mlp_norm(x).reshape(-1, x.shape[-1]))  # both MoE blocks take [T, H]
        return x + (out[0] if isinstance(out, tuple) else out).view_as(x)


class DecoderStack(nn.Module):
    """Embedding -> layers -> final norm (no LM head: decode inputs are drawn at random, not sampled)."""

    def __init__(self, cfg: StackConfig, **factory):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, **factory) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=1e-6, **factory)
        self.hf_blocks = [layer.mlp for layer in self.layers]

    def forward(self, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        if pos != 0 and tokens.shape[1] > 1:
            raise ValueError(f"prefill must start at position 0, got {pos} (one token at a time after it)")
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, pos)
        return self.norm(x)

    def use_blocks(self, blocks) -> None:
        for layer, block in zip(self.layers, blocks):
            layer.mlp = block


# ----------------------------------------------------------------------------------------------- jitmoe blocks

def fused_from_hf(block: SparseMoeBlock):
    """``jitmoe.nn.FusedMoE`` holding the same router and expert weights as the HF-style block."""
    fused_moe = common.jitmoe_attr("nn.FusedMoE")
    return fused_moe.from_hf_experts(block.gate.weight, block.experts, block.top_k,
                                     renormalize=block.norm_topk_prob).eval()


# ----------------------------------------------------------------------------------------------- top-k control

def validate_top_k(k, num_experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"top_k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= {num_experts} (the number of experts), got {k}")
    return k


def set_top_k(stack: DecoderStack, k: int) -> int:
    """Set ``top_k`` on every MoE block in use; returns how many blocks now read back k."""
    validate_top_k(k, stack.cfg.experts)
    for layer in stack.layers:
        layer.mlp.top_k = k
    return sum(1 for layer in stack.layers if layer.mlp.top_k == k)


class RoutingProbe(TorchDispatchMode):
    """Sees every op of one forward and records routing-id widths: ``aten::topk`` over the [T, E] router scores (the
    torch block) and int tensors [T, w] passed to or returned by ``jitmoe::`` ops (router and fused MoE ops)."""

    def __init__(self, tokens: int, experts: int):
        super().__init__()
        self.tokens, self.experts, self.seen = tokens, experts, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name == "aten::topk" and tuple(args[0].shape) == (self.tokens, self.experts):
            self.seen.append((name, out[1].shape[-1]))
        elif name.startswith("jitmoe::"):
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == self.tokens \
                        and t.dtype in (torch.int32, torch.int64):
                    self.seen.append((name, t.shape[1]))
                    break
        return out


def verify_top_k(stack: DecoderStack, k: int, blocks_changed: int, device, dtype) -> dict:
    """One probed forward: every block must have changed and every router must have produced k-wide ids."""
    cache = KVCache(stack.cfg, VERIFY_TOKENS, device, dtype)
    tokens = torch.randint(stack.cfg.vocab, (1, VERIFY_TOKENS), device=device)
    probe = RoutingProbe(VERIFY_TOKENS, stack.cfg.experts)
    with torch.inference_mode(), probe:
        stack(tokens, cache, 0)
    widths = sorted({w for _, w in probe.seen})
    per_op = Counter(name for name, _ in probe.seen)
    ok = blocks_changed == stack.cfg.layers and widths == [k] and max(per_op.values(), default=0) >= stack.cfg.layers
    report = {"blocks_changed": blocks_changed, "blocks": stack.cfg.layers, "routing_ids_widths": widths,
              "routing_observations": dict(per_op), "ok": ok}
    if not ok:
        raise RuntimeError(f"top_k={k} did not take effect on every block: {report}")
    return report


# ----------------------------------------------------------------------------------------------- timing

def timed_ms(fn, device) -> float:
    """Latency of one call as a user sees it: events around it on CUDA (then a sync), perf_counter on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def latency_stats(samples_ms: list[float]) -> dict:
    s = common.summarize(samples_ms)
    return {"P50": s["median_ms"], "P95": s["p95_ms"], "P99": s["p99_ms"], "mean": s["mean_ms"],
            "std": s["std_ms"], "min": s["min_ms"], "max": s["max_ms"]}


@torch.inference_mode()
def measure(stack: DecoderStack, run: dict, device, dtype) -> dict:
    """Prefill of the prompt, then ``decode_tokens`` single-token steps, per sample; warm-up samples discarded."""
    cfg, P, N = stack.cfg, run["prompt_len"], run["decode_tokens"]
    cache = KVCache(cfg, P + N, device, dtype)
    prompt = torch.randint(cfg.vocab, (1, P), device=device)
    steps = torch.randint(cfg.vocab, (1, N), device=device)
    prefill, decode = [], []
    for sample in range(run["warmup"] + run["num_samples"]):
        p = timed_ms(lambda: stack(prompt, cache, 0), device)
        d = [timed_ms(lambda j=j: stack(steps[:, j:j + 1], cache, P + j), device) for j in range(N)]
        if sample >= run["warmup"]:
            prefill.append(p)
            decode.extend(d)
    return {"prefill": latency_stats(prefill), "decode": latency_stats(decode)}


def add_scaling(entries: list[dict]) -> None:
    """scaling = latency(k) / latency(k0) on P50, efficiency = (k / k0) / scaling, k0 the smallest k (1 by default)."""
    base = min(entries, key=lambda e: e["top_k"])
    for entry in entries:
        entry["scaling"], entry["efficiency"] = {}, {}
        for phase in ("prefill", "decode"):
            ratio = entry[phase]["P50"] / base[phase]["P50"]
            entry["scaling"][phase] = ratio
            entry["efficiency"][phase] = (entry["top_k"] / base["top_k"]) / ratio


def moe_traffic(cfg: StackConfig, k: int, tokens: int, itemsize: int) -> dict:
    """Expected experts touched per layer (uniform routing, as random router weights give) and the expert weight
    bytes a forward over ``tokens`` tokens must read: what the jitmoe latency should follow."""
    experts = common.expected_distinct(cfg.experts, k, tokens)
    return {"experts_per_layer": experts,
            "weight_MB": experts * 3 * cfg.hidden * cfg.intermediate * itemsize * cfg.layers / 1e6}


def sweep(stack: DecoderStack, impl: str, top_ks, run: dict, device, dtype) -> list[dict]:
    entries = []
    for k in top_ks:
        check = verify_top_k(stack, k, set_top_k(stack, k), device, dtype)
        traffic = {"prefill": moe_traffic(stack.cfg, k, run["prompt_len"], dtype.itemsize),
                   "decode": moe_traffic(stack.cfg, k, 1, dtype.itemsize)}
        entries.append({"top_k": k, **measure(stack, run, device, dtype), "moe_traffic": traffic,
                        "verification": check})
        e = entries[-1]
        print(f"  {impl} top_k={k}: prefill P50 {e['prefill']['P50']:.3f} ms, "
              f"decode P50 {e['decode']['P50']:.3f} ms/token", flush=True)
    add_scaling(entries)
    return entries


# ----------------------------------------------------------------------------------------------- report

def summary_table(results: dict) -> str:
    rows = [(impl, e["top_k"], e["prefill"]["P50"], e["decode"]["P50"], e["scaling"]["prefill"],
             e["scaling"]["decode"], e["efficiency"]["prefill"], e["efficiency"]["decode"],
             e["moe_traffic"]["decode"]["weight_MB"]) for impl, entries in results.items() for e in entries]
    table = common.markdown_table(["implementation", "top_k", "prefill P50 ms", "decode P50 ms/token",
                                   "prefill scaling", "decode scaling", "prefill eff.", "decode eff.",
                                   "decode expert MB/token"], rows)
    if {"torch", "jitmoe"} <= results.keys():
        jit = {e["top_k"]: e for e in results["jitmoe"]}
        table += "\n\n" + common.markdown_table(
            ["top_k", "prefill speedup (torch / jitmoe)", "decode speedup (torch / jitmoe)"],
            [(e["top_k"], e["prefill"]["P50"] / jit[e["top_k"]]["prefill"]["P50"],
              e["decode"]["P50"] / jit[e["top_k"]]["decode"]["P50"]) for e in results["torch"] if e["top_k"] in jit])
    return table


def plot(path, results: dict) -> None:
    panels = [{"title": f"{phase} latency (P50)", "xlabel": "top_k", "logx": 2, "logy": True,
               "ylabel": "ms" if phase == "prefill" else "ms / token",
               "series": {impl: ([e["top_k"] for e in entries], [e[phase]["P50"] for e in entries])
                          for impl, entries in results.items()}}
              for phase in ("prefill", "decode")]
    common.plot_panels(path, panels, "MoE decoder latency vs top-k")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementation", choices=("torch", "jitmoe", "both"), default="both")
    parser.add_argument("--top-k-values", default=None, help="comma list (default 1,2,4,8,16,32; <= experts)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and run (CPU test)")
    parser.add_argument("--quick", action="store_true", help="10 samples instead of 50 unless --num-samples is given")
    for name in ("prompt-len", "decode-tokens", "num-samples", "warmup"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {FULL_RUN[name.replace('-', '_')]}")
    for field in ("layers", "hidden", "heads", "experts", "intermediate", "vocab"):
        parser.add_argument(f"--{field}", type=int, default=None, help=f"default {getattr(StackConfig, field)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[StackConfig, dict, tuple[int, ...]]:
    """Model config, run lengths and the validated top-k values from the command line."""
    cfg = TINY if args.tiny else StackConfig()
    cfg = replace(cfg, **{f: getattr(args, f) for f in ("layers", "hidden", "heads", "experts", "intermediate",
                                                        "vocab") if getattr(args, f) is not None})
    if cfg.hidden % cfg.heads:
        raise ValueError(f"--hidden: expected a multiple of --heads ({cfg.heads}), got {cfg.hidden}")
    defaults = TINY_RUN if args.tiny else {**FULL_RUN, "num_samples": 10} if args.quick else FULL_RUN
    run = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
    if args.top_k_values:
        top_ks = common.parse_ints(args.top_k_values)
    else:
        top_ks = tuple(k for k in DEFAULT_TOP_K if k <= cfg.experts)
    for k in top_ks:
        validate_top_k(k, cfg.experts)
    return replace(cfg, top_k=min(cfg.top_k, cfg.experts)), run, top_ks


def implementations(stack: DecoderStack, wanted: str) -> tuple[dict, dict]:
    """({name: MoE blocks}, {name: why skipped})."""
    blocks, skipped = {}, {}
    if wanted in ("torch", "both"):
        blocks["torch"] = stack.hf_blocks
    if wanted in ("jitmoe", "both"):
        if common.jitmoe_attr("nn.FusedMoE") is None:
            skipped["jitmoe"] = "jitmoe.nn.FusedMoE not available yet: jitmoe implementation skipped"
            print(skipped["jitmoe"])
        else:
            try:
                blocks["jitmoe"] = [fused_from_hf(block) for block in stack.hf_blocks]
            except Exception as err:  # still time the torch block; main fails loudly at the end
                traceback.print_exc()
                skipped["jitmoe"] = f"failed: {type(err).__name__}: {err}"
    return blocks, skipped


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        cfg, run, top_ks = resolve(args)
    except (TypeError, ValueError) as err:  # bad command line: the message, not a traceback
        raise SystemExit(f"exp_topk_latency: {err}") from None
    device, dtype = common.pick_device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    stack = DecoderStack(cfg, device=device, dtype=dtype).eval()
    blocks, skipped = implementations(stack, args.implementation)
    print(f"device {common.device_name(device)}; {cfg}; run {run}; top_k {top_ks}")
    results = {}
    for impl, mlps in blocks.items():
        stack.use_blocks(mlps)
        try:
            results[impl] = sweep(stack, impl, top_ks, run, device, dtype)
        except Exception as err:  # keep the other implementation's numbers; fail loudly at the end
            traceback.print_exc()
            skipped[impl] = f"failed: {type(err).__name__}: {err}"
    payload = {"meta": common.environment(device, "exp_topk_latency", None), "unit": "ms (decode: per token)",
               "config": asdict(cfg), "run": run, "dtype": args.dtype, "top_k_values": list(top_ks),
               "scaling_note": "scaling = P50(k) / P50(smallest k); efficiency = (k / smallest k) / scaling",
               "skipped": skipped, "results": results}
    json_path = common.write_json(common.result_path("exp_topk_latency", device, args.out, "json"), payload)
    if not args.no_plot and results:
        plot(json_path.with_suffix(".png"), results)
    if results:
        print("\n" + summary_table(results))
    failed = {impl: why for impl, why in skipped.items() if why.startswith("failed")}
    if failed:
        raise SystemExit(f"exp_topk_latency: {failed}")
    return payload


if __name__ == "__main__":
    main()
