"""`pixel_transform`: ToTensor + Normalize bit for bit, the flip, torchvision's tensor ColorJitter
and grayscale per image, on the kernels (interpreter) and the PyTorch path alike; one launch,
two with jitter; empty batches; bad input named."""
import pytest
import torch
from torchvision.transforms import functional as TF

from alignclip_kernels import pixel_transform, pixels
from alignclip_kernels.pixels import JITTER_COLUMNS, _torch_pixel_transform
from utils import gen

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


def _inputs(b, h, w, seed=0, grayscale=(2,)):
    g = gen(seed)
    images = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)
    images[0, :, :3] = 128                          # grey pixels: hue's max == min branch
    flip = (torch.rand(b, generator=g) > 0.5).float()
    jitter = torch.zeros(b, JITTER_COLUMNS)
    for k in range(b):
        jitter[k, :3] = torch.empty(3).uniform_(0.7, 1.3, generator=g)
        jitter[k, 3] = torch.empty(1).uniform_(-0.3, 0.3, generator=g)
        jitter[k, 4:8] = torch.randperm(4, generator=g).float()
        jitter[k, 8] = float(k in grayscale)
    return images, flip, jitter


def _torchvision(images, flip, jitter):
    """ToTensor, flip, ColorJitter's stages in each image's order, RandomGrayscale, Normalize."""
    stages = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for k in range(len(images)):
        x = images[k].permute(2, 0, 1).float().div(255)
        if flip[k] > 0.5:
            x = x.flip(-1)
        if jitter is not None:
            for op in jitter[k, 4:8].int().tolist():
                x = stages[op](x, jitter[k, op].item())
            if jitter[k, 8] > 0.5:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
        out.append(TF.normalize(x, MEAN.tolist(), STD.tolist()))
    return torch.stack(out)


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_without_jitter_it_is_totensor_and_normalize_bit_for_bit(path):
    images, flip, _ = _inputs(5, 19, 37)
    run = pixel_transform if path == "kernels" else lambda *a, **k: _torch_pixel_transform(*a, k["flip"], None)
    assert torch.equal(run(images, MEAN, STD, flip=flip), _torchvision(images, flip, None))


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_jitter_is_torchvisions_tensor_jitter_per_image(path):
    images, flip, jitter = _inputs(6, 23, 41)
    want = _torchvision(images, flip, jitter)
    if path == "kernels":
        got = pixel_transform(images, MEAN, STD, flip=flip, jitter=jitter)
    else:
        got = _torch_pixel_transform(images, MEAN, STD, flip, jitter)
    # both paths take hue's closed form of HSV -> RGB and sum contrast's mean in their own
    # order: a few fp32 ulps of [0, 1] (divided by std here)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_channels_last_views_of_any_strides_are_read_as_they_are():
    images, flip, jitter = _inputs(4, 16, 18)
    wide = torch.zeros(4, 16, 40, 3, dtype=torch.uint8)
    wide[:, :, 5:23] = images
    view = wide[:, :, 5:23]
    torch.testing.assert_close(pixel_transform(view, MEAN, STD, flip=flip, jitter=jitter),
                               pixel_transform(images, MEAN, STD, flip=flip, jitter=jitter), rtol=0, atol=0)


def test_one_launch_two_with_jitter(launches):
    images, flip, jitter = _inputs(3, 8, 8)
    for with_jitter in (False, True):
        with launches() as counted:
            pixel_transform(images, MEAN, STD, flip=flip, jitter=jitter if with_jitter else None)
        assert len(counted) == pixels.launches(with_jitter) == 1 + with_jitter, counted.names


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_an_empty_batch_gives_an_empty_output(path):
    images = torch.zeros(0, 8, 8, 3, dtype=torch.uint8)
    run = pixel_transform if path == "kernels" else lambda i, m, s, **k: _torch_pixel_transform(i, m, s, None, None)
    assert run(images, MEAN, STD).shape == (0, 3, 8, 8)


def test_bad_input_is_named():
    images, flip, jitter = _inputs(2, 4, 4)
    cases = [
        ((images.float(), MEAN, STD), {}, TypeError, "images must be uint8"),
        ((images[..., :2], MEAN, STD), {}, ValueError, r"images must have shape \[B, H, W, 3\]"),
        ((images, MEAN[:2], STD), {}, ValueError, r"mean must have shape \[3\]"),
        ((images, MEAN, STD), {"flip": flip[:1]}, ValueError, "flip: its length"),
        ((images, MEAN, STD), {"jitter": jitter[:, :4]}, ValueError, r"jitter must have shape \[B, 9\]"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            pixel_transform(*args, **kwargs)
