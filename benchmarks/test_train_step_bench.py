"""train-step: one full optimizer step (forward, loss, backward, AdamW, BMA) on a batch:
clip-finetune (CLIPood: stock open_clip tower with SDPA, MMS loss, BMA), alignclip-reference
(the authors' path) and alignclip-fused; ViT-B/16 on 108 images on CUDA, a small ViT on the CPU.
Also dual-block-out-proj: the two out_proj arrangements of a dual block."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from alignclip import AlignCLIPLoss, AlignCLIPVisual, BetaMovingAverage
from alignclip_kernels import reference as ref
from conftest import CUDA, DEVICE, measure
from providers import authors_attention, bma_loop, mms_loss

if CUDA:
    TOWER = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                 output_dim=512)
    BATCH, LABEL = 108, "ViT-B/16 B=108"
else:
    TOWER = dict(image_size=64, patch_size=16, width=128, layers=6, heads=2, mlp_ratio=4.0,
                 output_dim=64)
    BATCH, LABEL = 16, "ViT W128x6 B=16 (CPU)"
K = 7
OURS = "alignclip-fused" if CUDA else "alignclip-fallback"   # the PyTorch path without CUDA
PROVIDERS = ["clip-finetune", "alignclip-reference", OURS]


def _step_fn(provider):
    torch.manual_seed(0)
    visual = VisionTransformer(**TOWER).to(DEVICE)
    text = F.normalize(torch.randn(K, TOWER["output_dim"], device=DEVICE), dim=-1)
    images = torch.randn(BATCH, 3, TOWER["image_size"], TOWER["image_size"], device=DEVICE)
    labels = torch.randint(0, K, (BATCH,), device=DEVICE)
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-6, weight_decay=0.1)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=CUDA)
    if provider == "clip-finetune":
        bma = BetaMovingAverage(visual, 10 ** 6)

        def loss_fn():
            return mms_loss(visual(images), text, labels)
    else:
        if provider == OURS:
            model = AlignCLIPVisual(visual, dual_layers=6)
            criterion = AlignCLIPLoss(text)
        else:
            model = AlignCLIPVisual(visual, dual_layers=6, attention=authors_attention)
            criterion = AlignCLIPLoss(text, ops=ref)
        bma = BetaMovingAverage(visual, 10 ** 6)

        def loss_fn():
            return criterion(model(images), labels).total
    if provider == "alignclip-reference":
        averaged, params = list(bma.module.parameters()), list(visual.parameters())
        state = {"sum": bma.weight_sum, "step": 0}

        def average():
            state["step"] += 1
            state["sum"] = bma_loop(averaged, params, state["step"], 10 ** 6, 0.5, state["sum"])
    else:
        average = bma.update

    def step():
        with torch.autocast(**amp):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        average()

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    step = _step_fn(provider)
    step()
    measure(benchmark, step, group=f"train-step {LABEL}", provider=provider,
            rounds=10 if CUDA else 3, images=BATCH)


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
