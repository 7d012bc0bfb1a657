"""Op families: each validates inputs, picks a KernelSpec, loads it through jitmoe.jit and launches it."""
import importlib

_FAMILIES = ("routing", "expert_choice", "omni_router", "permute", "moe_gemm", "moe_decode", "fused_moe",
             "moe_autotune")


def prewarm_registry() -> dict:
    """{op name: fn(dtypes, topks, archs) -> [KernelSpec]} gathered from every family (for `jitmoe prewarm`)."""
    table = {}
    for name in _FAMILIES:
        table.update(getattr(importlib.import_module(f"{__name__}.{name}"), "PREWARM", {}))
    return table
