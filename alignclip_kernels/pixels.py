r"""The input pipeline's per-pixel work on the training device: a uint8 batch of the final size
in, the normalised float batch out, with the horizontal flip, DomainBed's colour jitter and its
random grayscale applied per image from per-image parameters.

images [B, H, W, 3] uint8 (channels last, as decoders write them; any strides), flip [B] (> 0.5
mirrors an image), jitter [B, 9] fp32 (brightness, contrast, saturation and hue factors, the
stage order as four op indices 0-3, the grayscale coin), mean and std per channel:

    x   = u8 / 255                                          ToTensor
    x   = x[..., ::-1]                  where flip           RandomHorizontalFlip (a mirrored read)
    for each of the image's four stages, in its order        ColorJitter on tensors (torchvision)
        0 brightness b:  x = clamp(b·x, 0, 1)
        1 contrast c:    x = clamp(c·x + (1 − c)·m, 0, 1),  m = the image's mean of gray(x)
        2 saturation s:  x = clamp(s·x + (1 − s)·gray(x), 0, 1)
        3 hue h:         x = hsv2rgb((hue(x) + h) mod 1, sat(x), max(x))
    x   = gray(x) in all three channels  where the coin fell   RandomGrayscale
    out = (x − mean) / std                                   Normalize

with gray(x) = 0.2989 r + 0.587 g + 0.114 b and torchvision's RGB-HSV formulas. Divisions are
correctly rounded, so without jitter `out` is bit for bit what ToTensor + Normalize give for
the same pixels.

Launches: one program per (image, block of pixels), reading every input byte once and writing
every output value once. Without jitter, one launch. With jitter, two: m needs the whole
image after the stages before contrast, so the first launch writes each block's sum of gray(x)
after those stages, and the second sums an image's block sums in index order (no atomics: the
same bits on every run) and does the rest. Nothing larger than the output is allocated.
Every stage runs once per pixel (the stage's branch is uniform over a program).
"""
import torch

from . import _checks
from ._runtime import HAS_TRITON, next_pow2, on_device, runs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

JITTER_COLUMNS = 9          # brightness, contrast, saturation, hue, order × 4, grayscale
BLOCK = 1024                # pixels a program
GRAY = (0.2989, 0.587, 0.114)

if HAS_TRITON:
    @triton.jit
    def _gray(r, g, b):
        return 0.2989 * r + 0.587 * g + 0.114 * b

    @triton.jit
    def _blend(x, other, ratio):
        return tl.clamp(ratio * x + (1.0 - ratio) * other, 0.0, 1.0)

    @triton.jit
    def _hue(r, g, b, shift):
        """The hue stage of the module docstring (see `_hue_torch`, the same arithmetic)."""
        maxc = tl.maximum(tl.maximum(r, g), b)
        minc = tl.minimum(tl.minimum(r, g), b)
        chroma = maxc - minc
        flat = tl.where(chroma == 0.0, 1.0, 0.0)
        divisor = chroma + flat
        is_r = tl.where(maxc == r, 1.0, 0.0)
        is_g = tl.where(maxc == g, 1.0, 0.0)
        h_gb = is_g * (tl.math.div_rn(b - r, divisor) + 2.0) + (1.0 - is_g) * (tl.math.div_rn(r - g, divisor) + 4.0)
        h = tl.math.div_rn(is_r * tl.math.div_rn(g - b, divisor) + (1.0 - is_r) * h_gb, 6.0) + 1.0
        h = h - tl.floor(h) + shift
        h6 = (h - tl.floor(h)) * 6.0
        vs = maxc * tl.math.div_rn(chroma, maxc * (1.0 - flat) + flat)
        return _hsv_channel(h6, maxc, vs, 5.0), _hsv_channel(h6, maxc, vs, 3.0), _hsv_channel(h6, maxc, vs, 1.0)

    @triton.jit
    def _hsv_channel(h6, v, vs, n):
        k = n + h6
        k = k - 6.0 * tl.floor(tl.math.div_rn(k, 6.0))
        return tl.clamp(v - vs * tl.clamp(tl.minimum(k, 4.0 - k), 0.0, 1.0), 0.0, 1.0)

    @triton.jit
    def _stage(r, g, b, op, factor, mean):
        """One jitter stage (op 0-3, see the module docstring) on a block of pixels."""
        if op == 0:
            r, g, b = _blend(r, 0.0, factor), _blend(g, 0.0, factor), _blend(b, 0.0, factor)
        elif op == 1:
            r, g, b = _blend(r, mean, factor), _blend(g, mean, factor), _blend(b, mean, factor)
        elif op == 2:
            gray = _gray(r, g, b)
            r, g, b = _blend(r, gray, factor), _blend(g, gray, factor), _blend(b, gray, factor)
        elif op == 3:
            r, g, b = _hue(r, g, b, factor)
        return r, g, b

    @triton.jit
    def _load_pixels(Img, Flip, b, offs, mask, W, stride_ib, stride_ih, stride_iw, stride_ic, stride_f,
                     FLIP: tl.constexpr):
        y = offs // W
        x = offs % W
        if FLIP:
            if tl.load(Flip + b * stride_f).to(tl.float32) > 0.5:
                x = W - 1 - x
        base = Img + b * stride_ib + y * stride_ih + x * stride_iw
        r = tl.math.div_rn(tl.load(base, mask=mask, other=0).to(tl.float32), 255.0)
        g = tl.math.div_rn(tl.load(base + stride_ic, mask=mask, other=0).to(tl.float32), 255.0)
        bl = tl.math.div_rn(tl.load(base + 2 * stride_ic, mask=mask, other=0).to(tl.float32), 255.0)
        return r, g, bl

    @triton.jit
    def _pixels_mean_kernel(
        Img, Jitter, Partial,
        stride_ib, stride_ih, stride_iw, stride_ic, stride_jb, stride_jk,
        H, W, N_BLOCKS,
        BLOCK: tl.constexpr,
    ):
        """Per (image, block): Σ gray(x) over the block after the image's stages before contrast."""
        pid = tl.program_id(0)
        b = (pid // N_BLOCKS).to(tl.int64)
        blk = pid % N_BLOCKS
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H * W
        r, g, bl = _load_pixels(Img, Img, b, offs, mask, W, stride_ib, stride_ih, stride_iw, stride_ic, 0,
                                FLIP=False)
        params = Jitter + b * stride_jb
        contrast_at = 0
        for stage in tl.static_range(4):
            contrast_at += stage * (tl.load(params + (4 + stage) * stride_jk) == 1.0).to(tl.int32)
        for stage in tl.static_range(4):
            op = tl.load(params + (4 + stage) * stride_jk).to(tl.int32)
            if stage < contrast_at:
                r, g, bl = _stage(r, g, bl, op, tl.load(params + op * stride_jk), 0.0)
        gray = tl.where(mask, _gray(r, g, bl), 0.0)
        tl.store(Partial + b * N_BLOCKS + blk, tl.sum(gray, axis=0))

    @triton.jit
    def _pixels_kernel(
        Img, Flip, Jitter, Partial, Mean, Std, Out,
        stride_ib, stride_ih, stride_iw, stride_ic, stride_f, stride_jb, stride_jk,
        stride_ob, stride_oc,
        H, W, N_BLOCKS,
        BLOCK: tl.constexpr, BLOCKS_P2: tl.constexpr, FLIP: tl.constexpr, JITTER: tl.constexpr,
    ):
        """Per (image, block): the whole transform of the module docstring."""
        pid = tl.program_id(0)
        b = (pid // N_BLOCKS).to(tl.int64)
        blk = pid % N_BLOCKS
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H * W
        r, g, bl = _load_pixels(Img, Flip, b, offs, mask, W, stride_ib, stride_ih, stride_iw, stride_ic,
                                stride_f, FLIP=FLIP)
        if JITTER:
            parts = tl.arange(0, BLOCKS_P2)
            total = tl.sum(tl.load(Partial + b * N_BLOCKS + parts, mask=parts < N_BLOCKS, other=0.0), axis=0)
            mean = tl.math.div_rn(total, (H * W).to(tl.float32))
            params = Jitter + b * stride_jb
            for stage in tl.static_range(4):
                op = tl.load(params + (4 + stage) * stride_jk).to(tl.int32)
                r, g, bl = _stage(r, g, bl, op, tl.load(params + op * stride_jk), mean)
            if tl.load(params + 8 * stride_jk) > 0.5:
                gray = _gray(r, g, bl)
                r, g, bl = gray, gray, gray
        out = Out + b * stride_ob + offs
        for c in tl.static_range(3):
            x = r if c == 0 else (g if c == 1 else bl)
            x = tl.math.div_rn(x - tl.load(Mean + c), tl.load(Std + c))
            tl.store(out + c * stride_oc, x, mask=mask)


def launches(jitter):
    """Kernel launches of one `pixel_transform` call (the tests count them)."""
    return 2 if jitter else 1


def _pixels_fwd(images, mean, std, flip, jitter):
    b, h, w, _ = images.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=images.device)
    if b == 0 or h * w == 0:
        return out
    n_blocks = triton.cdiv(h * w, BLOCK)
    grid = (b * n_blocks,)
    strides = dict(stride_ib=images.stride(0), stride_ih=images.stride(1), stride_iw=images.stride(2),
                   stride_ic=images.stride(3))
    partial = torch.empty((b * n_blocks,), dtype=torch.float32, device=images.device) if jitter is not None \
        else out
    jitter_arg = jitter if jitter is not None else out
    jitter_strides = dict(stride_jb=jitter.stride(0), stride_jk=jitter.stride(1)) if jitter is not None \
        else dict(stride_jb=0, stride_jk=0)
    with on_device(images):
        if jitter is not None:
            _pixels_mean_kernel[grid](Img=images, Jitter=jitter_arg, Partial=partial, **strides, **jitter_strides,
                                      H=h, W=w, N_BLOCKS=n_blocks, BLOCK=BLOCK, num_warps=8)
        _pixels_kernel[grid](
            Img=images, Flip=flip if flip is not None else out, Jitter=jitter_arg, Partial=partial, Mean=mean,
            Std=std, Out=out, **strides, stride_f=flip.stride(0) if flip is not None else 0, **jitter_strides,
            stride_ob=out.stride(0), stride_oc=out.stride(1), H=h, W=w, N_BLOCKS=n_blocks, BLOCK=BLOCK,
            BLOCKS_P2=next_pow2(n_blocks), FLIP=flip is not None, JITTER=jitter is not None,
            num_warps=8)   # 4 pixels a thread: at 8, sm_80's ptxas spills (ptxas report)
    return out


def _gray_torch(x):
    return GRAY[0] * x[0] + GRAY[1] * x[1] + GRAY[2] * x[2]


def _blend_torch(x, other, ratio):
    """clamp(ratio·x + (1 − ratio)·other) in place on one image, with torchvision's roundings."""
    return x.mul_(ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def _hue_torch(x, shift):
    """The hue stage on one image x [3, H, W], in float arithmetic alone (branch-free: bool and
    integer tensors are slow on the CPU): H from the max channel's sector, shifted mod 1, and
    each channel as v − v·s·clamp(min(k, 4 − k), 0, 1), k = (n + 6H) mod 6, n = 5, 3, 1 (the
    closed form of torchvision's `_hsv2rgb` table)."""
    r, g, b = x
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    flat = torch.sign(chroma).neg_().add_(1.0)                 # 1 where max == min
    divisor = chroma + flat
    is_r = torch.sign(maxc - r).neg_().add_(1.0)
    is_g = torch.sign(maxc - g).neg_().add_(1.0)
    h_gb = is_g * ((b - r).div_(divisor).add_(2.0)) + (1.0 - is_g).mul_((r - g).div_(divisor).add_(4.0))
    h = (is_r * (g - b).div_(divisor)).add_((1.0 - is_r).mul_(h_gb)).div_(6.0).add_(1.0)
    h = h.sub_(torch.floor(h)).add_(shift)
    h6 = h.sub_(torch.floor(h)).mul_(6.0)
    vs = chroma.div_(maxc * (1.0 - flat) + flat).mul_(maxc)
    for channel, n in zip(x, (5.0, 3.0, 1.0)):
        k = h6 + n
        k = k.sub_(torch.floor(k / 6.0).mul_(6.0))
        weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, weight.mul_(vs), out=channel).clamp_(0.0, 1.0)
    return x


def _jitter_torch(x, factors, order, gray):
    """One image's stages in its order, then its grayscale coin, in place (x in [0, 1])."""
    for op in order:
        factor = factors[op]
        if op == 0:
            x.mul_(factor).clamp_(0.0, 1.0)
        elif op == 1:
            _blend_torch(x, _gray_torch(x).mean(), factor)
        elif op == 2:
            _blend_torch(x, _gray_torch(x), factor)
        else:
            _hue_torch(x, factor)
    if gray:
        x.copy_(_gray_torch(x).expand_as(x))


def _torch_pixel_transform(images, mean, std, flip, jitter):
    """The same transform in PyTorch, one image at a time while it sits in cache: converted
    (mirrored as it is read), its jitter stages in place in its order, normalised. Nothing
    beyond the output is allocated but one image's temporaries."""
    b, h, w, _ = images.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=images.device)
    mirrored = (flip > 0.5).tolist() if flip is not None else [False] * b
    params = jitter.tolist() if jitter is not None else [None] * b
    mean, std = mean.view(3, 1, 1), std.view(3, 1, 1)
    for k in range(b):
        source, x = images[k].permute(2, 0, 1), out[k]
        x.copy_(source.flip(-1) if mirrored[k] else source).div_(255)
        if params[k] is not None:
            _jitter_torch(x, params[k][:4], [int(o) for o in params[k][4:8]], params[k][8] > 0.5)
        x.sub_(mean).div_(std)
    return out


def _check(images, mean, std, flip, jitter):
    _checks.tensor("images", images, 4, "[B, H, W, 3] uint8", floating=False)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [B, H, W, 3], got {images.dtype}")
    if images.shape[3] != 3:
        raise ValueError(f"images must have shape [B, H, W, 3] (channels last), got {tuple(images.shape)}")
    b = images.shape[0]
    for name, value in (("mean", mean), ("std", std)):
        _checks.tensor(name, value, 1, "[3]")
        if value.shape != (3,):
            raise ValueError(f"{name} must have shape [3], got {tuple(value.shape)}")
    if flip is not None:
        _checks.tensor("flip", flip, 1, f"[B]=[{b}]")
        _checks.size("flip", flip.shape[0], b, "its length (the batch)")
    if jitter is not None:
        _checks.tensor("jitter", jitter, 2, f"[B, {JITTER_COLUMNS}]")
        if tuple(jitter.shape) != (b, JITTER_COLUMNS):
            raise ValueError(f"jitter must have shape [B, {JITTER_COLUMNS}]=[{b}, {JITTER_COLUMNS}], "
                             f"got {tuple(jitter.shape)}")
    _checks.same_device(images=images, mean=mean, std=std, **({"flip": flip} if flip is not None else {}),
                        **({"jitter": jitter} if jitter is not None else {}))


def pixel_transform(images, mean, std, *, flip=None, jitter=None):
    """Normalised float [B, 3, H, W] of uint8 images [B, H, W, 3]: the module docstring's
    transform (flip and jitter optional). `mean` and `std` are fp32 [3] tensors on the images'
    device; `flip` [B], `jitter` [B, 9] fp32 per-image parameters."""
    _check(images, mean, std, flip, jitter)
    mean, std = mean.to(torch.float32), std.to(torch.float32)
    if not runs_triton(mean):
        return _torch_pixel_transform(images, mean, std, flip, jitter)
    return _pixels_fwd(images, mean.contiguous(), std.contiguous(), flip,
                       None if jitter is None else jitter.to(torch.float32))
