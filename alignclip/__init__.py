"""AlignCLIP training on open_clip with the fused ops of `alignclip_kernels`."""
from .bma import BetaMovingAverage

__all__ = ["BetaMovingAverage"]
