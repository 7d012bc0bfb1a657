"""Pure-torch references of every op: the CPU path of the public API and the oracle of the GPU tests.

One module per op family, written for clarity (float32/float64 math, explicit loops where clearer), not speed.
Modules load on first use, like the op families.
"""
import importlib

_MODULES = ("routing", "expert_choice", "omni", "moe")


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    for module_name in _MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        if name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'jitmoe.reference' has no attribute {name!r}")
