"""Pictures: attention.png (target-domain test images under their CLS attention, mean over the
AAL layers and heads, CLS key dropped, and the second path's target G, before and after
training), a sweep's results.png and ablation.png, and the WiSE-FT robustness.png. Drawn with
matplotlib's object API (importing this module changes no global backend), laid out by
matplotlib's constrained layout with legends outside the axes and titles wrapped to the
figure's width, so no text leaves the canvas and no legend covers data; each is saved as PNG
and as PDF beside it."""
import math
import os
import textwrap

import torch

from alignclip_kernels import token_text_target

from .config import resolved_transforms
from .data import preprocessing
from .data.pipeline import load_images

COLUMN_WIDTH = 3.5    # inches: one column of a two-column paper


def new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _on_canvas(fig, artist):
    fig.draw_without_rendering()          # runs the constrained layout (the artist's final place), paints nothing
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.x1 <= fig.bbox.width


def fitted_title(set_title, text, fig, fontsize):
    """`set_title(text, fontsize=...)` (an axes' `set_title` or `fig.suptitle`) with `text`
    wrapped at the widest line length whose drawn title stays on the canvas (measured: glyph
    widths vary with the font and an axes' title is centred on the axes, not the figure)."""
    chars = len(text)
    title = set_title(text, fontsize=fontsize)
    while chars > 12 and not _on_canvas(fig, title):
        chars = min(chars - 4, int(chars * fig.bbox.width / max(title.get_window_extent().width, 1)))
        title = set_title(textwrap.fill(text, max(chars, 12)), fontsize=fontsize)
    return title


def fitted_legend(fig, handles, labels, fontsize, ncols):
    """A legend below the axes with as many columns (up to `ncols`) as the canvas's width holds."""
    for cols in range(min(ncols, len(handles)), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=cols, fontsize=fontsize,
                            frameon=False)
        if cols == 1 or _on_canvas(fig, legend):
            return legend
        legend.remove()


def save_figure(fig, path):
    """`path` (PNG) and the same figure as PDF beside it, laid out once for both (the
    constrained layout of a figure of many axes takes a second each time it runs)."""
    if fig.stale:                         # changed since `fitted_title` or `fitted_legend` laid it out
        fig.draw_without_rendering()
    fig.set_layout_engine("none")         # keeps the positions computed last
    fig.savefig(path, dpi=150)
    fig.savefig(os.path.splitext(path)[0] + ".pdf")
    return fig


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


def figure_set(task):
    """(eval set name, its label) of the images attention.png shows: a target domain's test images
    where their classes are the training classes (domain shift, open class's base, ImageNet's
    shifted sets), else the source validation images."""
    for name in ("test", "imagenet_sketch", "imagenet_v2", "imagenet"):
        eval_set = task.eval_sets.get(name)
        if eval_set and eval_set.samples and eval_set.classnames == task.classnames:
            where = ", ".join(d for d, _ in eval_set.domains) or name
            return name, f"{'target domain' if name == 'test' else 'test set'}: {where}"
    return "val", f"source validation images: {', '.join(task.domain_names)}"


def attention_snapshot(model, task, cfg, text, size, device):
    """CLS attention, target G and prediction for a few test images of a target domain (see
    `figure_set`), one class after another."""
    name, label = figure_set(task)
    eval_set = task.eval_sets[name]
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
            "layers": list(model.aal_layers), "set": label}


def save_attention_figure(path, before, after, transforms, task):
    """A row per image: the image with its class, then the CLS attention before and after
    training on one colour scale and the target G before and after on another (G's range is not
    attention's: one shared scale would flatten one of them), each with its colourbar; the
    domain the images come from in the title, predictions under the attention maps."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    spec = preprocessing(transforms)
    mean, std = (torch.tensor(x).view(3, 1, 1) for x in (spec.mean, spec.std))
    names = task.classnames
    layers = after.get("layers") or before.get("layers") or []
    columns = [("attention before", before, "attn"), ("attention after", after, "attn"),
               ("G before", before, "target"), ("G after", after, "target")]
    images = before["images"]
    side = images.shape[-1]
    fig = new_figure(2.0 * (len(columns) + 1) + 1.2, 2.1 * len(images) + 0.9)
    axes = fig.subplots(len(images), len(columns) + 1, squeeze=False)
    for r, img in enumerate(images):
        picture = (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        maps = {(title, key): torch.nn.functional.interpolate(snap[key][r][None, None], size=(side, side),
                                                               mode="bilinear", align_corners=False)[0, 0].numpy()
                for title, snap, key in columns}
        label = int(before["labels"][r]) if "labels" in before else None
        axes[r][0].imshow(picture)
        axes[r][0].set_title(f"class: {names[label]}" if label is not None else "image", fontsize=8)
        for key, cols in (("attn", (1, 2)), ("target", (3, 4))):
            heats = [maps[(columns[c - 1][0], key)] for c in cols]
            scale = ScalarMappable(Normalize(min(h.min() for h in heats), max(h.max() for h in heats)),
                                   colormaps["inferno" if key == "attn" else "viridis"])
            for c, heat in zip(cols, heats):
                title, snap, _ = columns[c - 1]
                ax = axes[r][c]
                # the map laid over the image at 60% opacity, blended here: one image an axes to draw
                ax.imshow(0.4 * picture + 0.6 * scale.to_rgba(heat)[..., :3])
                pred = snap.get("preds")
                ax.set_title(title if pred is None or key != "attn" else f"{title}\npred: {names[int(pred[r])]}",
                             fontsize=8)
            fig.colorbar(scale, ax=[axes[r][c] for c in cols], shrink=0.8, pad=0.02).ax.tick_params(labelsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    averaged = f"blocks {', '.join(map(str, layers))}" if layers else "the AAL blocks"
    where = before.get("set") or after.get("set") or "evaluation images"
    fitted_title(fig.suptitle, f"{where}. CLS attention to the patches (mean over {averaged} and heads) and the "
                 "second path's target G, each on its own colour scale per row", fig, 9)
    return save_figure(fig, path)


def _bars(ax, results, shown, metric, tower_of):
    """Grouped bars per target: each shown method's mean over seeds, its seeds' range and each
    seed as a dot; returns the legend handles."""
    width = 0.8 / max(len(shown), 1)
    handles = []
    for k, (method, label, color) in enumerate(shown):
        tower = tower_of(method)
        drawn = None
        for i, target in enumerate(results["targets"]):
            values = [r["metrics"][tower][metric] for r in results["runs"]
                      if r["status"] == "ok" and r["method"] == method and r["target"] == target
                      and r["metrics"].get(tower, {}).get(metric) is not None]
            if not values:
                continue
            x = i + (k - (len(shown) - 1) / 2) * width
            mean = sum(values) / len(values)
            drawn = ax.bar(x, mean, width * 0.9, color=color,
                           yerr=[[mean - min(values)], [max(values) - mean]] if len(values) > 1 else None, capsize=2)
            ax.scatter([x] * len(values), values, s=6, color="black", zorder=3)
        if drawn is not None:
            handles.append((drawn, label))
    ax.set_xticks(range(len(results["target_names"])))
    ax.set_xticklabels(results["target_names"], fontsize=7, rotation=20 if len(results["target_names"]) > 3 else 0)
    ax.tick_params(axis="y", labelsize=7)
    return handles


HEADLINE = {"domain_shift": ("test", "test accuracy (%)"), "in_the_wild": ("open", "open-class accuracy (%)"),
            "open_class": ("harmonic", "H of base and new (%)"), "imagenet_shift": ("ood", "OOD average (%)")}


def _legend(fig, handles):
    if handles:
        fitted_legend(fig, [h for h, _ in handles], [label for _, label in handles], 7, 3)


def _bar_figure(path, results, shown, size, title):
    """Grouped bars of the shown methods' BMA towers (zero-shot CLIP's own) per target, the
    task's headline metric, titled and with the legend below."""
    metric, ylabel = HEADLINE[results["task"]]
    fig = new_figure(*size)
    ax = fig.subplots()
    handles = _bars(ax, results, shown, metric, lambda m: "zero_shot" if m == "zero-shot" else "bma")
    ax.set_ylabel(ylabel, fontsize=8)
    fitted_title(ax.set_title, title, fig, 8)
    _legend(fig, handles)
    return save_figure(fig, path)


def save_results_figure(path, results):
    """results.png: per target, zero-shot CLIP, CLIPood and AlignCLIP (BMA towers) as bars of
    the mean over seeds with the seeds' spread (min to max) and each seed as a dot."""
    shown = [("zero-shot", "zero-shot CLIP", "#999999"), ("clipood", "CLIPood (BMA)", "#4c72b0"),
             ("alignclip", "AlignCLIP (BMA)", "#dd8452")]
    shown = [s for s in shown if any(r["method"] == s[0] for r in results["runs"])]
    return _bar_figure(path, results, shown, (max(COLUMN_WIDTH, 1.1 * len(results["targets"]) + 1.2), 2.9),
                       f"{results['dataset']}: mean over seeds, bars the seeds' range, dots each seed")


def save_ablation_figure(path, results):
    """ablation.png: every method and variant of a sweep (BMA towers) per target, like the
    paper's ablation figure."""
    from matplotlib import colormaps

    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    palette = colormaps["tab10"]
    names = {"zero-shot": "zero-shot CLIP", "clipood": "CLIPood", "alignclip": "AlignCLIP"}
    shown = [(m, names.get(m, m), palette(i % 10)) for i, m in enumerate(methods)]
    width = max(COLUMN_WIDTH, 0.5 * len(methods) * len(results["targets"]) + 1.5)
    return _bar_figure(path, results, shown, (width, 3.1),
                       f"{results['dataset']} ablation: BMA towers, mean over seeds with their range")
