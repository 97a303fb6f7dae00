"""What a data worker does to one image: decode it (`decode.py`), then crop and resize it to the
output size. The batch it hands over is uint8 of the final size; only per-pixel work (flip,
jitter, normalisation: `device_transforms.py`) is left to the training device.

One geometry serves training and evaluation: a box of the decoded image (the random crop, or
the whole image) resized to out_h × out_w, of which a size × size window is kept (all of it
in training; eval's `CenterCrop`). The resize is torchvision's antialiased bilinear filter on
uint8 (`F.interpolate(..., antialias=True)`, the filter PIL's `BILINEAR` applies when it
shrinks): against the authors' `Compose` (PIL's resize of the same box) the pixels differ by at
most a level or two, at PSNR >= 50 dB (`tests/test_pipeline.py`), for a third of PIL's time.

Where a JPEG's box is at least twice the output on both sides, it is decoded at 1/2, 1/4 or 1/8
of its size with JPEG's DCT scaling, and PIL resizes the box, in the reduced image's
coordinates, with the same filter (exact geometry); equivalent by the same PSNR test.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import dct_scale, decode


def _pil_resize(pixels, box, out_h, out_w, scale):
    """PIL's bilinear resize of the box (in full-image coordinates) of a DCT-reduced image."""
    top, left, height, width = box
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    coords = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
    resized = img.resize((out_w, out_h), Image.BILINEAR, box=coords)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def resized_crop(image, box, out_h, out_w, window, size, decoded=None):
    """uint8 [3, size, size] (channels-last memory): the box (top, left, height, width) of the
    `Encoded` image (or of its `decoded` pixels, when already at hand), resized to out_h × out_w,
    its size × size window at (top, left)."""
    top, left, height, width = box
    if decoded is None:
        pixels, scale = decode(image, dct_scale(image, height, width, out_h, out_w))
    else:
        pixels, scale = decoded, 1
    if scale > 1:
        resized = _pil_resize(pixels, box, out_h, out_w, scale)
    else:
        # channels-last in, channels-last out: torchvision's vectorised uint8 path, and the
        # collate into the [B, S, S, 3] batch is then a plain copy
        crop = pixels[None, :, top:top + height, left:left + width].contiguous(memory_format=torch.channels_last)
        if (height, width) == (out_h, out_w):
            resized = crop[0]
        else:
            resized = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True,
                                    align_corners=False)[0]
    wt, wl = window
    return resized[:, wt:wt + size, wl:wl + size]
