"""se_kernels: the Squeeze-and-Excitation block as one fused op, forward and backward.

    from se_kernels import FusedSE, fused_se, fused_channel_attention, convert_se_modules, available_backends
"""

from .attention import fused_channel_attention
from .convert import convert_se_modules
from .functional import fused_se
from .modules import FusedSE
from .ops import available_backends

__all__ = ["FusedSE", "fused_se", "fused_channel_attention", "convert_se_modules", "available_backends"]
__version__ = "0.1.0"
