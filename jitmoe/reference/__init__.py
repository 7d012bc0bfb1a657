"""Pure-torch references of every op: the CPU path of the public API and the oracle of the GPU tests.

One module per op family; they are written for clarity (float32/float64 math, explicit loops where that is clearer),
not speed.
"""
from .expert_choice import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .omni import *  # noqa: F401,F403
from .routing import *  # noqa: F401,F403
