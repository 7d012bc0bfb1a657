"""jitmoe: JIT-compiled CUDA Mixture-of-Experts kernels for PyTorch.

Op families are imported on first use (PEP 562), so `import jitmoe` stays cheap and a warm first call pays only
for the family it calls. Importing a family registers its `torch.ops.jitmoe.*` ops.
"""
import importlib

__version__ = "0.1.0"

# Public name -> the op family that defines it (each family lists the same names in __all__; a CPU test checks
# that the two agree). A lookup imports only that family: importing a family registers its torch ops, which costs
# milliseconds that a warm first call should not pay for families it does not use.
_PUBLIC = {
    "routing": ("topk_softmax", "topk_sigmoid", "grouped_topk"),
    "expert_choice": ("expert_choice", "expert_choice_capacity"),
    "omni_router": ("omni_router", "omni_router_func"),
    "permute": ("moe_align", "moe_align_bound", "moe_combine"),
    "fused_moe": ("cutlass_fused_moe", "ActivationType", "autotune"),
}
_FAMILY_OF = {name: family for family, names in _PUBLIC.items() for name in names}
_FAMILIES = tuple(_PUBLIC)
_SUBMODULES = ("jit", "ops", "nn", "quant", "reference", "testing", "env", "cli", "demo")


def _family(name: str):
    return importlib.import_module(f"jitmoe.ops.{name}")


def __getattr__(name: str):
    if name == "__all__":
        return [n for f in _FAMILIES for n in _family(f).__all__]
    if name in _SUBMODULES:
        return importlib.import_module(f"jitmoe.{name}")
    if name in _FAMILY_OF:
        value = getattr(_family(_FAMILY_OF[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'jitmoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FAMILY_OF))
