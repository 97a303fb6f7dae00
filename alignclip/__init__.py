"""AlignCLIP training on open_clip, timm or transformers towers with the fused ops of
`alignclip_kernels`."""
from .bma import BetaMovingAverage
from .losses import AlignCLIPLoss, LossTerms
from .model import AlignCLIPVisual, VisualOutput

__all__ = ["AlignCLIPLoss", "AlignCLIPVisual", "BetaMovingAverage", "LossTerms", "VisualOutput"]
