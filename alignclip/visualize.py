"""attention.png: validation images beside their CLS attention (mean over the AAL layers and
heads, CLS key dropped) and the D-V target G, before and after training."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from alignclip_kernels import token_text_target  # noqa: E402

from .data.samples import CLIP_MEAN, CLIP_STD  # noqa: E402


@torch.no_grad()
def attention_maps(model, images, labels, text, temperature):
    """([B, g, g] CLS attention, [B, g, g] target G) as CPU float tensors."""
    out = model(images)
    attn = out.cls_attn.float().mean(dim=(0, 2))[:, 1:]
    attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
    g = token_text_target(out.tokens_dv[:, 1:], text.to(out.tokens_dv.dtype), labels,
                          temperature=temperature)
    side = math.isqrt(attn.shape[1])
    return attn.reshape(-1, side, side).cpu(), g.reshape(-1, side, side).float().cpu()


def save_attention_figure(path, images, before, after):
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    columns = [("image", None), ("attention before", before[0]), ("G before", before[1]),
               ("attention after", after[0]), ("G after", after[1])]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.2 * len(images)),
                             squeeze=False)
    for r, img in enumerate(images):
        for c, (title, maps) in enumerate(columns):
            ax = axes[r][c]
            if maps is None:
                ax.imshow((img.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
            else:
                ax.imshow(maps[r].numpy(), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
