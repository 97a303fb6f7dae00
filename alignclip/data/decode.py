"""Reading image files: the pixels the authors' loader sees (PIL, `convert("RGB")`), decoded as
cheaply as the file allows, and a plain-words reason for every file that cannot be read.

- RGB and grayscale JPEGs go to torchvision's libjpeg-turbo decoder (PIL's pixels, faster on
  one core); their size and channel count come from the file's frame header, read here without
  a decoder, so the crop is drawn before the decode. Where the crop can be read at half its
  size or less (`dct_scale`), PIL decodes the image with JPEG's DCT scaling (`Image.draft`),
  which skips most of the inverse DCT.
- Every other file (PNG, CMYK JPEG, ...) is decoded by PIL and converted to RGB, once (its size
  is the decoded image's).

Decoded images are uint8 [3, H, W] tensors whose memory is channels-last (how both decoders
write them), so the worker's resize reads them without a copy.
"""
import io
import os
import struct
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

# JPEG frame headers (SOF0-15 but DHT, JPG and DAC) hold the size and the channel count
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
DCT_SCALES = (8, 4, 2)


class CorruptImageError(RuntimeError):
    """One line naming the file that could not be read and why."""

    @staticmethod
    def one_line(exc):
        """The original one-line message, also when a DataLoader worker re-raised the error (its
        message is then the worker's whole traceback, whose last line is the original)."""
        lines = [line for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        marker = "CorruptImageError: "
        return last.split(marker, 1)[1] if marker in last else last


def unreadable(path, reason):
    exc = CorruptImageError(f"unreadable image {path}: {reason}; set data.skip_corrupt=true to skip "
                            "unreadable images")
    exc.path, exc.reason = path, reason
    return exc


def reason_of(exc):
    """What is wrong with a file, in words, from the decoder's exception."""
    text = str(exc).lower()
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (no known image format)"
    if "truncated" in text or "incomplete" in text or "premature end" in text:
        return "truncated (the file ends before the image does)"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return f"cannot be decoded ({first[:120]})"


class Encoded(NamedTuple):
    """An image file as read: its path, its bytes (uint8 tensor) and, for a JPEG, the (height,
    width, channels) of its frame header."""
    path: str
    raw: torch.Tensor
    jpeg: Optional[Tuple[int, int, int]]

    @property
    def stream(self):
        return io.BytesIO(self.raw.numpy().tobytes())


def read_image(path):
    """The file at `path` as `Encoded`, or a CorruptImageError saying why not."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
    except OSError as exc:
        raise unreadable(path, exc.strerror or str(exc)) from None
    if not data:
        raise unreadable(path, "empty file (0 bytes)")
    return Encoded(path, torch.frombuffer(data, dtype=torch.uint8), jpeg_header(data))


def jpeg_header(data):
    """(height, width, channels) from a JPEG's frame header (`data`: the file's first bytes), or
    None for anything else."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if marker in _SOF:
            if at + 10 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return height, width, data[at + 9]
        at += 2 + length
    return None


def dct_scale(image, box_h, box_w, out_h, out_w):
    """The largest JPEG DCT reduction (8, 4, 2 or 1) after which a box of box_h × box_w pixels
    of `image` still covers out_h × out_w: PIL's `draft` then decodes that much smaller."""
    if image.jpeg is None or image.jpeg[2] not in (1, 3):
        return 1
    for scale in DCT_SCALES:
        if box_h / scale >= out_h and box_w / scale >= out_w:
            return scale
    return 1


def _pil_rgb(img):
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def decode(image, scale=1):
    """(uint8 [3, H, W] with channels-last memory, the reduction applied) of an `Encoded`
    image: the full image (1), or with `scale` > 1 (a JPEG's DCT reduction, see `dct_scale`)
    the image decoded at ceil(side / scale) pixels a side."""
    try:
        if scale > 1:
            with Image.open(image.stream) as img:
                full = img.size
                img.draft("RGB", (full[0] // scale, full[1] // scale))
                applied = scale if img.size == (-(-full[0] // scale), -(-full[1] // scale)) else 1
                return _pil_rgb(img), applied
        if image.jpeg is not None and image.jpeg[2] in (1, 3):
            return decode_jpeg(image.raw, mode=ImageReadMode.RGB), 1
        with Image.open(image.stream) as img:
            return _pil_rgb(img), 1
    except (OSError, UnidentifiedImageError, ValueError, RuntimeError) as exc:
        raise unreadable(image.path, reason_of(exc)) from None


def load_rgb(path):
    """The image as the authors' loader gives it: PIL, `convert("RGB")` (the reference the
    tests and the benchmarks hold the pipeline to)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise unreadable(path, reason_of(exc)) from None
