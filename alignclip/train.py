"""Training: `train(cfg)` reads top to bottom.

Only the image encoder trains: the text encoder is frozen and embeds every class prompt once.
AdamW with a cosine schedule over `epochs × iters_per_epoch` steps, bf16 autocast on CUDA (fp32
on the CPU), the model in eval mode while training as the authors do, BMA after every step, the
source domains' validation accuracy after every epoch (the best epoch's tower is kept). Under
`torchrun` the same command trains with DistributedDataParallel: each rank takes its share of
every domain's batch, losses are logged as the mean over ranks, rank 0 writes.
"""
import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed
from .bma import BetaMovingAverage
from .checkpoint import FORMAT, RunError, load, load_weights, rng_state, save_atomic, set_rng_state
from .clip import build_clip, check_model, logit_scale
from .config import RunConfig
from .data import SampleDataset, StepBatches, build_task, train_transform, write_synthetic
from .data.samples import CorruptImageError
from .evaluate import accuracy, evaluate_towers, image_size, transforms_kind
from .losses import AlignCLIPLoss
from .model import AlignCLIPVisual
from .run import RunFolder, Stopped, StopSignals
from .text import class_text_features
from .visualize import attention_snapshot, save_attention_figure

LOGGED = ("total", "sls", "aal", "sim_align")
CHECKED = ("sls", "aal", "sim_align", "total")   # the term that went bad is named before the sum


@dataclass
class Progress:
    step: int = 0
    best_val: float = -1.0
    best_epoch: Optional[int] = None
    train_seconds: float = 0.0


def data_config(cfg, ddp):
    """cfg.data with its root resolved; the synthetic demo set is written under the run folder
    on first use."""
    data = cfg.data
    if data.dataset != "Synthetic":
        return data
    root = data.root or os.path.join(cfg.output_dir, "data")
    if ddp.main:
        s = data.synthetic
        write_synthetic(root, domains=s.domains, classes=s.classes, per_class=s.per_class,
                        size=s.image_size, seed=cfg.seed)
    ddp.barrier()
    return dataclasses.replace(data, root=root)


def step_batches(task, cfg, size, start, stop, ddp, device):
    """(images, labels) for steps start..stop-1: one batch from every training domain, labels
    checked on the host before they move to the device."""
    dc = cfg.data
    if dc.batch_size % ddp.world:
        raise RunError(f"data.batch_size {dc.batch_size} must divide by the {ddp.world} ranks")
    transform = train_transform(transforms_kind(cfg, task), size)
    loaders = []
    for d, samples in enumerate(task.train_domains):
        sampler = StepBatches(len(samples), dc.batch_size, cfg.seed, d, start, stop, ddp.rank, ddp.world)
        loaders.append(torch.utils.data.DataLoader(
            SampleDataset(samples, transform, dc.skip_corrupt), batch_sampler=sampler,
            num_workers=dc.num_workers, pin_memory=device.type == "cuda"))
    for parts in zip(*loaders):
        labels = torch.cat([p[1] for p in parts])
        if labels.min() < 0 or labels.max() >= len(task.classnames):
            raise RunError(f"a training label lies outside [0, {len(task.classnames)})")
        yield (torch.cat([p[0] for p in parts]).to(device, non_blocking=True),
               labels.to(device, non_blocking=True))


def check_finite(terms, visual, step, checkpoint):
    """One host sync per step: the loss terms and the gradient norm checked together."""
    values = [getattr(terms, name).detach().float() for name in CHECKED]
    grads = [p.grad for p in visual.parameters() if p.grad is not None]
    if grads:
        values.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float())
    finite = torch.isfinite(torch.stack(values)).tolist()
    kept = (f"the last checkpoint ({checkpoint}) is kept" if os.path.exists(checkpoint)
            else "no checkpoint was written yet")
    for name, value, ok in zip(CHECKED, values, finite):
        if not ok:
            raise RunError(f"step {step}: loss term {name} is not finite ({value.item()}); {kept}")
    if not all(finite):
        raise RunError(f"step {step}: the gradient is not finite (the loss terms were finite); {kept}")


def text_tower_state(clip, cfg):
    """A randomly initialised text tower (model.pretrained null) cannot be rebuilt from a tag:
    its weights travel with the checkpoint, so eval and export need no seed replay."""
    if cfg.model.pretrained is not None:
        return None
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}


def tensorboard_writer(cfg, folder, ddp, echo):
    if not (cfg.train.tensorboard and ddp.main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        echo("train.tensorboard is on but tensorboard is not installed (pip install "
             "'alignclip-kernels[tensorboard]'); logging to metrics.jsonl only")
        return None
    return SummaryWriter(os.path.join(folder.path, "tensorboard"))


def train(cfg: RunConfig, *, max_steps=None, resume=False, overwrite=False, echo=print):
    """Train (or resume) the run of `cfg`; returns the summary (rank 0). `max_steps` stops at
    that absolute step, so a resumed run ends where an unbroken one with the same flag ends."""
    try:
        return _train(cfg, max_steps, resume, overwrite, echo)
    except CorruptImageError as exc:   # also re-raised from a DataLoader worker
        raise RunError(CorruptImageError.one_line(exc)) from None


def _train(cfg, max_steps, resume, overwrite, echo):
    ddp = distributed.setup()
    device = distributed.resolve_device(cfg.train.device, ddp)
    folder = RunFolder(cfg.output_dir)
    check_model(cfg.model)
    if ddp.main:
        folder.prepare(cfg, resume=resume, overwrite=overwrite)
    ddp.barrier()
    torch.manual_seed(cfg.seed)

    # -- data, model, text features, loss, optimizer ------------------------------------------
    task = build_task(data_config(cfg, ddp), cfg.task, cfg.seed)
    clip, tokenizer = build_clip(cfg.model, device)
    visual = clip.visual
    template = cfg.model.template or task.template
    text = {"train": class_text_features(clip, tokenizer, task.classnames, template, device)}
    for name, eval_set in task.eval_sets.items():
        text[name] = class_text_features(clip, tokenizer, eval_set.classnames, template, device)
    model = AlignCLIPVisual(visual, dual_layers=cfg.model.dual_layers, aal_layers=cfg.model.aal_layers,
                            out_proj_mode=cfg.model.out_proj_mode)
    lc = cfg.loss
    criterion = AlignCLIPLoss(text["train"], alpha=lc.alpha, epsilon=lc.epsilon,
                              logit_scale=lc.logit_scale or logit_scale(clip), smoothing=lc.smoothing,
                              aloss=lc.aloss, temperature=lc.temperature, align=lc.align)
    optimizer = torch.optim.AdamW(visual.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.total_steps)
    bma = BetaMovingAverage(visual, cfg.total_steps, beta=cfg.train.bma_beta)
    progress = Progress()
    size = image_size(visual)

    # -- resume ----------------------------------------------------------------------------------
    if resume and os.path.exists(folder.last):
        state = load(folder.last, map_location=device)
        folder.check_resumable(state["config"], cfg)
        load_weights(visual, state["visual"], folder.last, "image tower")
        bma.load_state_dict(state["bma"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        progress = Progress(**state["progress"])
        if ddp.main:
            folder.truncate_metrics(progress.step)
        echo(f"resumed from step {progress.step}")
    elif resume:
        echo(f"no checkpoint at {folder.last}: starting from step 0")

    def save():
        if ddp.main:
            save_atomic({"format": FORMAT, "step": progress.step, "config": cfg.to_dict(),
                         "visual": visual.state_dict(), "bma": bma.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": rng_state(), "progress": dataclasses.asdict(progress), "text": text,
                         "classnames": {"train": task.classnames,
                                        **{k: v.classnames for k, v in task.eval_sets.items()}},
                         "logit_scale": criterion.logit_scale, "template": template,
                         "text_tower": text_tower_state(clip, cfg)}, folder.last)
        ddp.barrier()

    if ddp.main and cfg.train.attention_images and cfg.loss.align and not os.path.exists(folder.before):
        snapshot = attention_snapshot(model, task, cfg, text["train"], size, device)
        if snapshot is not None:
            save_atomic(snapshot, folder.before)

    # -- the loop --------------------------------------------------------------------------------
    net = model
    if ddp.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def forward(images, labels):
        return criterion(net(images), labels)

    if cfg.train.compile:
        forward = torch.compile(forward)
    stop = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    tb = tensorboard_writer(cfg, folder, ddp, echo)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with StopSignals() as signals:
        for images, labels in step_batches(task, cfg, size, progress.step, stop, ddp, device):
            started = time.perf_counter()
            with torch.autocast(**amp):
                terms = forward(images, labels)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            check_finite(terms, visual, progress.step + 1, folder.last)
            optimizer.step()
            scheduler.step()
            bma.update()
            progress.step += 1
            progress.train_seconds += time.perf_counter() - started

            if progress.step % cfg.train.log_every == 0 or progress.step == stop:
                means = ddp.mean(torch.stack([getattr(terms, k).detach().float() for k in LOGGED]))
                row = {"step": progress.step, **dict(zip(LOGGED, means.tolist())),
                       "lr": scheduler.get_last_lr()[0], "seconds": round(progress.train_seconds, 3)}
                if ddp.main:
                    folder.log(row)
                    if tb:
                        for key in (*LOGGED, "lr"):
                            tb.add_scalar(f"train/{key}", row[key], progress.step)
            if cfg.train.select_best and progress.step % cfg.train.iters_per_epoch == 0:
                if ddp.main:
                    val = accuracy(visual, task.eval_sets["val"], text["val"], cfg, task, size, device)
                    if val is not None and val > progress.best_val:
                        progress.best_val = val
                        progress.best_epoch = progress.step // cfg.train.iters_per_epoch
                        save_atomic({"visual": visual.state_dict(), "epoch": progress.best_epoch,
                                     "step": progress.step, "val": val}, folder.best)
                ddp.barrier()
            if signals.received:
                save()
                raise Stopped(signals.received, progress.step, folder.last)
            if progress.step % cfg.train.checkpoint_every == 0 and progress.step < stop:
                save()
    save()

    # -- evaluation ------------------------------------------------------------------------------
    summary = None
    if ddp.main:
        towers = {"last": visual, "bma": bma.module}
        if os.path.exists(folder.best):
            towers["best"] = copy.deepcopy(bma.module)
            towers["best"].load_state_dict(load(folder.best, map_location=device, required=("visual",))["visual"])
        results = evaluate_towers(towers, task, text, cfg, size, device)
        summary = {"num_classes": len(task.classnames), "steps": progress.step,
                   "seconds_per_step": progress.train_seconds / max(progress.step, 1),
                   "best_epoch": progress.best_epoch, **results}
        folder.write_json(folder.summary, summary)
        if os.path.exists(folder.before):
            before = load(folder.before, required=("images",))
            after = attention_snapshot(model, task, cfg, text["train"], size, device)
            save_attention_figure(os.path.join(cfg.output_dir, "attention.png"), before, after,
                                  transforms_kind(cfg, task))
        if tb:
            for tag, accs in results.items():
                for name, acc in accs.items():
                    if acc is not None:
                        tb.add_scalar(f"{tag}/{name}", acc, progress.step)
            tb.close()
    ddp.barrier()
    return summary
