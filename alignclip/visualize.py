"""Pictures: attention.png (validation images under their CLS attention, mean over the AAL
layers and heads, CLS key dropped, and the D-V target G, before and after training) and a
sweep's results.png. Drawn with matplotlib's object API: importing this module changes no
global backend."""
import math

import torch

from alignclip_kernels import token_text_target

from .config import resolved_transforms
from .data import preprocessing
from .data.pipeline import load_images


@torch.no_grad()
def attention_maps(model, images, labels, text, temperature):
    """([B, g, g] CLS attention, [B, g, g] target G, [B] predicted class) on the CPU."""
    out = model(images)
    attn = out.cls_attn.float().mean(dim=(0, 2))[:, 1:]
    attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
    g = token_text_target(out.tokens_dv[:, 1:], text.to(out.tokens_dv.dtype), labels,
                          temperature=temperature)
    preds = (torch.nn.functional.normalize(out.tokens[:, 0].float(), dim=-1) @ text.float().T).argmax(-1)
    side = math.isqrt(attn.shape[1])
    return attn.reshape(-1, side, side).cpu(), g.reshape(-1, side, side).float().cpu(), preds.cpu()


def attention_snapshot(model, task, cfg, text, size, device):
    """CLS attention, target G and prediction for a few validation images, one class after another."""
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
    attn, target, preds = attention_maps(model, images, labels, text, cfg.loss.temperature)
    return {"images": images.cpu(), "attn": attn, "target": target, "labels": labels.cpu(), "preds": preds,
            "layers": list(model.aal_layers)}


def save_attention_figure(path, before, after, transforms, task):
    """A row per image: the image with its class, then the CLS attention and the target G before
    and after training laid over it at image resolution, one colour scale per row (the
    colourbar at its end) so that a flat map looks flat; predictions in the titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = preprocessing(transforms)
    mean, std = (torch.tensor(x).view(3, 1, 1) for x in (spec.mean, spec.std))
    names = task.classnames
    layers = after.get("layers") or before.get("layers") or []
    columns = [("attention before", before, "attn"), ("G before", before, "target"),
               ("attention after", after, "attn"), ("G after", after, "target")]
    images = before["images"]
    side = images.shape[-1]
    fig = Figure(figsize=(2.3 * (len(columns) + 1) + 0.6, 2.4 * len(images)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(images), len(columns) + 1, squeeze=False)
    for r, img in enumerate(images):
        picture = (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        maps = [torch.nn.functional.interpolate(snap[key][r][None, None], size=(side, side), mode="bilinear",
                                                align_corners=False)[0, 0].numpy() for _, snap, key in columns]
        low, high = min(m.min() for m in maps), max(m.max() for m in maps)
        label = int(before["labels"][r]) if "labels" in before else None
        axes[r][0].imshow(picture)
        axes[r][0].set_title(f"class: {names[label]}" if label is not None else "image", fontsize=8)
        shown = None
        for c, ((title, snap, key), heat) in enumerate(zip(columns, maps), start=1):
            ax = axes[r][c]
            ax.imshow(picture)
            shown = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=low, vmax=high)
            pred = snap.get("preds")
            caption = title if pred is None or key != "attn" else f"{title}\npred: {names[int(pred[r])]}"
            ax.set_title(caption, fontsize=8)
        fig.colorbar(shown, ax=list(axes[r]), fraction=0.02, pad=0.01)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    averaged = f"blocks {', '.join(map(str, layers))}" if layers else "the AAL blocks"
    fig.suptitle(f"CLS attention to the patches (mean over {averaged} and heads) and the D-V target G; "
                 "one colour scale per row", fontsize=9)
    fig.savefig(path, dpi=100)
    return fig


def save_results_figure(path, results):
    """results.png: per target, zero-shot CLIP, CLIPood and AlignCLIP (BMA towers) as bars of
    the mean over seeds with the seeds' spread (min to max) and each seed as a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = "test"
    shown = [("zero-shot", "zero_shot", "zero-shot CLIP", "#999999"), ("clipood", "bma", "CLIPood (BMA)", "#4c72b0"),
             ("alignclip", "bma", "AlignCLIP (BMA)", "#dd8452")]
    shown = [s for s in shown if any(r["method"] == s[0] for r in results["runs"])]
    names = results["target_names"]
    fig = Figure(figsize=(max(4.0, 1.6 * len(names) + 1.5), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(len(shown), 1)
    for k, (method, tower, label, color) in enumerate(shown):
        for i, target in enumerate(results["targets"]):
            values = [r["metrics"][tower][metric] for r in results["runs"]
                      if r["status"] == "ok" and r["method"] == method and r["target"] == target
                      and r["metrics"].get(tower, {}).get(metric) is not None]
            if not values:
                continue
            x = i + (k - (len(shown) - 1) / 2) * width
            mean = sum(values) / len(values)
            ax.bar(x, mean, width * 0.9, color=color, label=label if i == 0 else None,
                   yerr=[[mean - min(values)], [max(values) - mean]] if len(values) > 1 else None, capsize=3)
            ax.scatter([x] * len(values), values, s=8, color="black", zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['dataset']}: mean over seeds, bars the seeds' range, dots each seed", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
