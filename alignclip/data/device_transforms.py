"""The per-pixel work left to the training device: a uint8 batch of the final size (the
workers cropped and resized it) becomes the normalised float batch the model takes, with each
image's flip and, for DomainBed's stock transforms, its colour jitter and grayscale coin, in
one fused op (`alignclip_kernels.pixel_transform`: one kernel launch, two with jitter, on CUDA;
the same arithmetic in PyTorch ops on the CPU)."""
import torch

from alignclip_kernels import pixel_transform
from alignclip_kernels.pixels import launches

FLIP, JITTER = 8, slice(9, 18)   # columns of the parameter vector (preprocess.py)


class DeviceTransform:
    """(uint8 [B, S, S, 3], params [B, PARAMS]) on the device -> normalised float [B, 3, S, S]."""

    def __init__(self, spec, device):
        self.spec = spec
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device)

    @property
    def launches(self):
        """Kernel launches a batch costs on CUDA (besides the copies of images, parameters and labels)."""
        return launches(bool(self.spec.jitter))

    def __call__(self, images, params):
        return pixel_transform(images, self.mean, self.std, flip=params[:, FLIP],
                               jitter=params[:, JITTER] if self.spec.jitter else None)
