"""attention.png: validation images beside their CLS attention (mean over the AAL layers and
heads, CLS key dropped) and the D-V target G, before and after training. Drawn with
matplotlib's object API: importing this module changes no global backend."""
import math

import torch

from alignclip_kernels import token_text_target

from .config import resolved_transforms
from .data import preprocessing
from .data.pipeline import load_images


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


def attention_snapshot(model, task, cfg, text, size, device):
    """CLS attention and target G for a few validation images, one class after another."""
    eval_set = task.eval_sets["val"]   # labelled with the training classes in every task
    n = cfg.train.attention_images
    if not eval_set.samples or n == 0 or not model.aal_layers:
        return None
    by_class = {}
    for i, s in enumerate(eval_set.samples):
        by_class.setdefault(s.label, []).append(i)
    queues = list(by_class.values())
    picks = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)][:n]
    images = load_images([eval_set.samples[i] for i in picks], resolved_transforms(cfg), size, device,
                         cfg.data.skip_corrupt)
    labels = torch.tensor([eval_set.samples[i].label for i in picks], device=device)
    attn, target = attention_maps(model, images, labels, text, cfg.loss.temperature)
    return {"images": images.cpu(), "attn": attn, "target": target}


def save_attention_figure(path, before, after, transforms):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = preprocessing(transforms)
    mean, std = (torch.tensor(x).view(3, 1, 1) for x in (spec.mean, spec.std))
    columns = [("image", None), ("attention before", before["attn"]), ("G before", before["target"]),
               ("attention after", after["attn"]), ("G after", after["target"])]
    images = before["images"]
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * len(images)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    for r, img in enumerate(images):
        for c, (title, maps) in enumerate(columns):
            ax = axes[r][c]
            if maps is None:
                ax.imshow((img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
            else:
                ax.imshow(maps[r].numpy(), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
