"""train-step: one optimizer step (forward, loss, backward, AdamW, BMA) on a batch:
- clip-finetune: stock open_clip tower, CLIPood's MMS loss, BMA;
- clip-finetune-packed: the same CLIP step through the library (one path, no CLS rows) with
  SLS+MMS: CLIPood as `sweep --baseline` runs it, the floor for AlignCLIP's price;
- alignclip-reference: the authors' path (materialised softmax, eager losses);
- alignclip-pytorch-path: our model and loss through the PyTorch paths (the SDPA composite
  attention, the reference loss ops): the strongest rival of equal output;
- alignclip-fused: ours (kernels; on CUDA the attention's per-shape choice).
`-compiled` rows run the same step with `torch.compile` over model and loss (as
`train.compile=true`), warmed up; the compile time is recorded apart (`compile_s`). ViT-B/16 on
108 images in bf16 on CUDA, a small ViT on the CPU; peak memory each. Also dual-block-out-proj:
the two out_proj arrangements of a dual block."""
import time

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from providers import authors_attention, bma_loop, composite_attention, mms_loss

from alignclip import AlignCLIPLoss, AlignCLIPVisual, BetaMovingAverage
from alignclip_kernels import reference as ref
from conftest import CUDA, DEVICE, measure, needs_cuda

if CUDA:
    TOWER = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512)
    BATCH, LABEL = 108, "ViT-B/16 B=108"
else:
    TOWER = dict(image_size=64, patch_size=16, width=128, layers=6, heads=2, mlp_ratio=4.0, output_dim=64)
    BATCH, LABEL = 16, "ViT W128x6 B=16 (CPU)"
K = 7
STEPS = ["clip-finetune", "clip-finetune-packed", "alignclip-reference", "alignclip-pytorch-path", "alignclip-fused"]
COMPILED = ["clip-finetune-packed", "alignclip-pytorch-path", "alignclip-fused"]
PROVIDERS = STEPS + [f"{p}-compiled" for p in COMPILED]


def _step_fn(provider):
    """(one optimizer step, the loss function it compiles or not)."""
    compiled = provider.endswith("-compiled")
    provider = provider.removesuffix("-compiled")
    torch.manual_seed(0)
    visual = VisionTransformer(**TOWER).to(DEVICE)
    text = F.normalize(torch.randn(K, TOWER["output_dim"], device=DEVICE), dim=-1)
    images = torch.randn(BATCH, 3, TOWER["image_size"], TOWER["image_size"], device=DEVICE)
    labels = torch.randint(0, K, (BATCH,), device=DEVICE)
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-6, weight_decay=0.1, fused=CUDA)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=CUDA)
    bma = BetaMovingAverage(visual, 10 ** 6)
    average = bma.update
    if provider == "clip-finetune":
        def loss_fn():
            return mms_loss(visual(images), text, labels)
    elif provider == "clip-finetune-packed":
        model, criterion = AlignCLIPVisual(visual, dual_layers=0, aal_layers=()), AlignCLIPLoss(text, align=False)

        def loss_fn():
            return criterion(model(images, align=False), labels).total
    elif provider == "alignclip-reference":
        model = AlignCLIPVisual(visual, dual_layers=6, attention=authors_attention)
        criterion = AlignCLIPLoss(text, ops=ref)
        averaged, params = list(bma.module.parameters()), list(visual.parameters())
        state = {"sum": bma.weight_sum, "step": 0}

        def loss_fn():
            return criterion(model(images), labels).total

        def average():
            state["step"] += 1
            state["sum"] = bma_loop(averaged, params, state["step"], 10 ** 6, 0.5, state["sum"])
    elif provider == "alignclip-pytorch-path":
        model = AlignCLIPVisual(visual, dual_layers=6, attention=composite_attention)
        criterion = AlignCLIPLoss(text, ops=ref)

        def loss_fn():
            return criterion(model(images), labels).total
    else:
        model, criterion = AlignCLIPVisual(visual, dual_layers=6), AlignCLIPLoss(text)

        def loss_fn():
            return criterion(model(images), labels).total

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def step():
        with torch.autocast(**amp):
            loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        average()

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    needs_cuda(provider)
    step = _step_fn(provider)
    info = {}
    if provider.endswith("-compiled"):
        started = time.perf_counter()
        step()
        info["compile_s"] = time.perf_counter() - started
    measure(benchmark, step, group=f"train-step {LABEL}", provider=provider, rounds=10 if CUDA else 3,
            images=BATCH, **info)


@pytest.mark.parametrize("provider", ["split", "stacked"])
def test_dual_block_out_proj(benchmark, provider):
    c = TOWER["width"]
    n = (TOWER["image_size"] // TOWER["patch_size"]) ** 2 + 1
    dtype = torch.bfloat16 if CUDA else torch.float32
    proj = torch.nn.Linear(c, c).to(DEVICE, dtype)
    out = torch.randn(BATCH, n, c, device=DEVICE, dtype=dtype, requires_grad=True)
    qkv = torch.randn(BATCH, n, 3 * c, device=DEVICE, dtype=dtype, requires_grad=True)
    grads = [torch.randn(BATCH, n, c, device=DEVICE, dtype=dtype) for _ in range(2)]

    def fn():
        dv = qkv[..., 2 * c:]          # the strided D-V view of the packed projection
        if provider == "split":
            a, b = proj(out), proj(dv)
        else:
            both = proj(torch.stack([out, dv]))
            a, b = both[0], both[1]
        torch.autograd.grad([a, b], [out, qkv, proj.weight], grads)

    measure(benchmark, fn, group=f"dual-block-out-proj {LABEL}", provider=provider)
