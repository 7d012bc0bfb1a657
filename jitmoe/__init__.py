"""jitmoe: JIT-compiled CUDA Mixture-of-Experts kernels for PyTorch.

Op families are imported on first use (PEP 562), so `import jitmoe` stays cheap and a warm first call pays only
for the family it calls. Importing a family registers its `torch.ops.jitmoe.*` ops.
"""
import importlib

__version__ = "0.1.0"

# Searched in this order for a public name; each module lists its public names in __all__.
_FAMILIES = ("routing", "expert_choice", "omni_router", "permute", "fused_moe")
_SUBMODULES = ("jit", "ops", "nn", "reference", "testing", "env", "cli", "demo")


def _family(name: str):
    return importlib.import_module(f"jitmoe.ops.{name}")


def __getattr__(name: str):
    if name == "__all__":
        return [n for f in _FAMILIES for n in _family(f).__all__]
    if name in _SUBMODULES:
        return importlib.import_module(f"jitmoe.{name}")
    for family in _FAMILIES:
        module = _family(family)
        if name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            globals()[name] = value  # later lookups skip __getattr__
            return value
    raise AttributeError(f"module 'jitmoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | {n for f in _FAMILIES for n in _family(f).__all__})
