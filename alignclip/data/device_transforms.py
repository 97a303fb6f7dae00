r"""The image work moved off the data workers onto the training device: crop, resize, flip,
colour jitter, grayscale and normalisation of a whole uint8 batch, per-sample parameters
(`preprocess.py`'s vector) in one tensor, no host sync.

Resize is PIL's bilinear resampling written as two matrix products. For one axis, an output
pixel o of a crop [a, a + n) resized to m pixels reads input x with weight

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
import torch
from torchvision.transforms import _functional_tensor as tvf

PRECISION = float(1 << 22)   # PIL's PRECISION_BITS for 8-bit resampling
HALF = float(1 << 11)


def axis_weights(start, length, out_len, window, size, in_len):
    """[B, size, in_len] float64 resampling weights for one axis, in PIL's fixed point: crop
    [start, start + length) resized to out_len pixels, output pixels window..window + size - 1.
    Arguments are [B] tensors (size, in_len: ints)."""
    f64 = dict(device=start.device, dtype=torch.float64)
    start, length, out_len, window = (t.to(torch.float64) for t in (start, length, out_len, window))
    scale = (length / out_len)[:, None, None]
    spread = scale.clamp_min(1.0)
    out = torch.arange(size, **f64)[None, :, None] + window[:, None, None]
    x = torch.arange(in_len, **f64)[None, None, :] - start[:, None, None]
    centre = (out + 0.5) * scale
    w = (1.0 - ((x + 0.5 - centre) / spread).abs()).clamp_min(0.0)
    w = w * ((x >= 0) & (x < length[:, None, None]))
    w = w / w.sum(-1, keepdim=True)
    return torch.floor(w * PRECISION + 0.5) / PRECISION


def _pil_pass(x, weights):
    """round(x @ weights) as PIL's integer arithmetic gives it, in fp32 matmuls: each 22-bit
    weight is split into two 11-bit halves, so that every product and partial sum of 8-bit
    pixels is exact in fp32 whatever the summation order (up to ~24 taps, a 10x shrink)."""
    high = torch.floor(weights * HALF) / HALF
    s_high = x @ high.to(torch.float32)
    s_low = x @ (weights - high).to(torch.float32)
    t = s_high + 0.5
    whole = torch.floor(t)
    return (whole + torch.floor((t - whole) + s_low)).clamp_(0.0, 255.0)


def resample(images, params, size):
    """uint8 [B, H, W, 3] (each image top-left, any padding) -> float [B, 3, size, size] in
    0..255, integral: crop, resize and flip exactly as PIL and torchvision do."""
    b, h, w, _ = images.shape
    p = params.to(torch.float64)
    wy = axis_weights(p[:, 0], p[:, 2], p[:, 4], p[:, 6], size, h)
    wx = axis_weights(p[:, 1], p[:, 3], p[:, 5], p[:, 7], size, w)
    wx = torch.where(p[:, 8, None, None] > 0.5, wx.flip(1), wx)
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")   # TF32 would drop the exactness
    try:
        horizontal = lambda t: _pil_pass(t, wx.transpose(1, 2)[:, None])
        vertical = lambda t: _pil_pass(t.transpose(2, 3), wy.transpose(1, 2)[:, None]).transpose(2, 3)
        h_first = vertical(horizontal(x))
        v_first = (p[:, 2] > p[:, 4]) & (p[:, 3] < p[:, 5])
        if images.device.type != "cpu" or bool(v_first.any()):   # a host read only where it is free
            h_first = torch.where(v_first.view(-1, 1, 1, 1), horizontal(vertical(x)), h_first)
        return h_first
    finally:
        torch.set_float32_matmul_precision(previous)


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
    """(uint8 [B, H, W, 3], params [B, PARAMS]) on the device -> normalised float [B, 3, s, s]."""

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
