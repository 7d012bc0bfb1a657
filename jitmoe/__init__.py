"""jitmoe: JIT-compiled CUDA Mixture-of-Experts kernels for PyTorch."""
__version__ = "0.1.0"

from .ops.expert_choice import *  # noqa: E402,F401,F403
from .ops.fused_moe import *  # noqa: E402,F401,F403
from .ops.omni_router import *  # noqa: E402,F401,F403
from .ops.permute import *  # noqa: E402,F401,F403
from .ops.quant import *  # noqa: E402,F401,F403
from .ops.routing import *  # noqa: E402,F401,F403
