r"""The image work moved off the data workers onto the training device: crop, resize, flip,
colour jitter, grayscale and normalisation of a whole uint8 batch, per-sample parameters
(`preprocess.py`'s vector) in one tensor, no host sync.

Resize is PIL's bilinear resampling, separable and banded: per axis a gather of K taps. For one
axis, an output pixel o of a crop [a, a + n) resized to m pixels reads input x with weight

    w(o, x) = tri((x - a + 0.5 - c_o) / f) / Σ_x tri(...),   c_o = (o + 0.5) · n / m,
    tri(t) = max(0, 1 - |t|),  f = max(n / m, 1)   (antialiasing when shrinking)

over the crop only (torchvision crops, then resizes), weights rounded to PIL's 22-bit fixed
point. PIL runs one pass, rounds to uint8 (half up), then the other and rounds again; so do we,
with fp32 products that are exact (`_pil_pass`). Pillow 13 runs the vertical pass first when
it shrinks and the horizontal one enlarges (the usual crop of a 227x227 PACS image), the
horizontal first otherwise as far as we measured; we follow that. Measured against Pillow 13
for the same crop boxes: eval and 500x375 training crops bit-identical, 227x227 training crops
bit-identical; crops shrinking both axes by different factors may differ by one level in a
pixel where Pillow's order differs (`tests/test_pipeline.py`: PSNR >= 40 dB, max 1 level).
A horizontal flip reverses the horizontal weights' output order; the eval center crop takes a
window of the output rows and columns.

Colour jitter follows torchvision's tensor ColorJitter per image (its order and factors from the
vector): brightness, contrast and saturation as blends whose identity factor 1 leaves an image
unchanged exactly, hue through torchvision's own HSV conversion where an image's stage is hue.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import _functional_tensor as tvf

PRECISION = float(1 << 22)   # PIL's PRECISION_BITS for 8-bit resampling
HALF = float(1 << 11)


def axis_taps(start, length, out_len, window, size, in_len):
    """(index [B, size, K] int64, weight [B, size, K] float64 in PIL's fixed point) of one
    axis: crop [start, start + length) resized to out_len pixels, output pixels window..window +
    size - 1. Arguments are [B] tensors (size, in_len: ints). K, the most taps any image of the
    batch can need, comes from the shapes alone (a crop is never longer than in_len, an output
    never shorter than size), so no value is read back from the device."""
    taps = 2 * math.ceil(max(in_len / size, 1.0)) + 1
    f64 = dict(device=start.device, dtype=torch.float64)
    start, length, out_len, window = (t.to(torch.float64)[:, None, None] for t in (start, length, out_len, window))
    scale = length / out_len
    spread = scale.clamp_min(1.0)
    centre = (torch.arange(size, **f64)[None, :, None] + window + 0.5) * scale
    first = torch.floor(centre - spread + 0.5).clamp_min(0.0)
    x = first + torch.arange(taps, **f64)[None, None, :]                  # crop coordinates
    w = (1.0 - ((x + 0.5 - centre) / spread).abs()).clamp_min(0.0) * (x < length)
    w = w / w.sum(-1, keepdim=True)
    index = (x + start).clamp(0, in_len - 1).to(torch.int64)
    return index, torch.floor(w * PRECISION + 0.5) / PRECISION


def _pil_pass(x, index, weight):
    """Resample x [B, 3, R, S] along its last axis to [B, 3, R, size] and round as PIL's integer
    arithmetic does. Each 22-bit weight is split into two 11-bit halves, so every product and
    partial sum of 8-bit pixels is exact in fp32 (up to ~24 taps, a 10x shrink)."""
    b, c, r, _ = x.shape
    size, taps = index.shape[1:]
    high = torch.floor(weight * HALF) / HALF
    low = (weight - high).to(torch.float32).permute(2, 0, 1).contiguous()[:, :, None, None, :]
    high = high.to(torch.float32).permute(2, 0, 1).contiguous()[:, :, None, None, :]
    index = index.permute(2, 0, 1).contiguous()
    s_high = torch.zeros(b, c, r, size, device=x.device)
    s_low = torch.zeros_like(s_high)
    for k in range(taps):
        pixels = torch.gather(x, 3, index[k][:, None, None, :].expand(b, c, r, size))
        s_high.addcmul_(pixels, high[k])
        s_low.addcmul_(pixels, low[k])
    t = s_high.add_(0.5)
    whole = torch.floor(t)
    return (whole + torch.floor((t - whole) + s_low)).clamp_(0.0, 255.0)


def resample(images, params, size):
    """uint8 [B, 3, H, W] (each image top-left, any padding) -> float [B, 3, size, size] in
    0..255, integral: crop, resize and flip as PIL and torchvision do. An image whose vertical
    pass runs first is transposed, so one horizontal-then-vertical pass serves the batch."""
    b, _, h, w = images.shape
    side = max(h, w)
    p = params.to(torch.float64)
    x = F.pad(images.to(torch.float32), (0, side - w, 0, side - h))
    ys = axis_taps(p[:, 0], p[:, 2], p[:, 4], p[:, 6], size, side)
    xs = axis_taps(p[:, 1], p[:, 3], p[:, 5], p[:, 7], size, side)
    flip = (p[:, 8] > 0.5).view(-1, 1, 1)
    xs = tuple(torch.where(flip, t.flip(1), t) for t in xs)
    v_first = (p[:, 2] > p[:, 4]) & (p[:, 3] < p[:, 5])
    swap = v_first.view(-1, 1, 1)
    first = tuple(torch.where(swap, y, x_) for y, x_ in zip(ys, xs))
    second = tuple(torch.where(swap, x_, y) for y, x_ in zip(ys, xs))
    x = torch.where(v_first.view(-1, 1, 1, 1), x.transpose(2, 3), x)
    x = _pil_pass(x, *first)                                       # [B, 3, side, size]
    x = _pil_pass(x.transpose(2, 3).contiguous(), *second).transpose(2, 3)
    return torch.where(v_first.view(-1, 1, 1, 1), x.transpose(2, 3), x).contiguous()


def _blend(img, other, ratio):
    return (ratio * img + (1.0 - ratio) * other).clamp(0.0, 1.0)


def _grayscale(img):
    return tvf.rgb_to_grayscale(img, num_output_channels=1)


def color_jitter(img, params):
    """torchvision's tensor ColorJitter with each image's order and factors; img in [0, 1]."""
    factors, order = params[:, 9:13], params[:, 13:17]
    for stage in range(4):
        op = order[:, stage].view(-1, 1, 1, 1)
        pick = lambda k, identity, op=op: torch.where(op == k, factors[:, k].view(-1, 1, 1, 1), identity)
        img = _blend(img, torch.zeros_like(img), pick(0, 1.0))
        img = _blend(img, _grayscale(img).mean(dim=(-3, -2, -1), keepdim=True), pick(1, 1.0))
        img = _blend(img, _grayscale(img), pick(2, 1.0))
        hsv = tvf._rgb2hsv(img)
        hue = torch.stack(((hsv[:, 0] + factors[:, 3].view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]), dim=1)
        img = torch.where(op == 3, tvf._hsv2rgb(hue), img)
    return img


class DeviceTransform:
    """(uint8 [B, 3, H, W], params [B, PARAMS]) on the device -> normalised float [B, 3, s, s]."""

    def __init__(self, spec, size, device):
        self.spec, self.size = spec, size
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(3, 1, 1)

    def __call__(self, images, params):
        img = resample(images, params, self.size).div_(255)       # ToTensor's x / 255
        if self.spec.jitter:
            img = color_jitter(img, params)
            img = torch.where(params[:, 17].view(-1, 1, 1, 1) > 0.5, _grayscale(img).expand_as(img), img)
        return img.sub_(self.mean).div_(self.std)
