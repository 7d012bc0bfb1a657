"""Op families: each validates inputs, picks a KernelSpec, loads it through jitmoe.jit and launches it."""
from . import expert_choice, fused_moe, moe_gemm, omni_router, permute, quant, routing

_FAMILIES = (routing, expert_choice, omni_router, permute, moe_gemm, fused_moe, quant)


def prewarm_registry() -> dict:
    """{op name: fn(dtypes, topks, archs) -> [KernelSpec]} gathered from every family (for `jitmoe prewarm`)."""
    table = {}
    for family in _FAMILIES:
        table.update(getattr(family, "PREWARM", {}))
    return table
