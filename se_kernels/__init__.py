"""se_kernels: the Squeeze-and-Excitation block as one fused op, forward and backward.

    from se_kernels import FusedSE, fused_se, available_backends
"""

from .functional import fused_se
from .modules import FusedSE
from .ops import available_backends

__all__ = ["FusedSE", "fused_se", "available_backends"]
__version__ = "0.1.0"
