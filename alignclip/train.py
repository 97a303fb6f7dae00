"""Training: `train(cfg)` reads top to bottom.

Only the image encoder trains: the text encoder is frozen and embeds every class prompt once.
AdamW with a cosine schedule over `epochs × iters_per_epoch` steps, bf16 autocast on CUDA (fp32
on the CPU), the model in eval mode while training as the authors do, BMA after every step, the
source domains' validation accuracy after every epoch (the best epoch's tower is kept). Under
`torchrun` the same command trains with DistributedDataParallel: each rank takes its share of
every domain's batch, losses are logged as the mean over ranks, rank 0 writes.

The loop never waits for the device: the finiteness of the loss terms and gradient and the
logged window means are read a step late (`lagged.py`), and always before a checkpoint is
written or the model evaluated, so a non-finite step still stops the run before it is saved.
"""
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed
from .bma import BetaMovingAverage
from .checkpoint import FORMAT, RunError, load, load_weights, rng_state, save_atomic, set_rng_state
from .checkpoint_writer import Schedule, background_writer
from .clip import build_clip, check_model, logit_scale, random_init_notice
from .config import RunConfig, resolved_transforms
from .data import DeviceBatches, build_task, train_loader, worker_count
from .data.decode import CorruptImageError
from .data.root import data_config
from .evaluate import Evaluator, image_size
from .lagged import LaggedReads
from .losses import AlignCLIPLoss
from .model import AlignCLIPVisual
from .monitor import Monitor
from .run import RunFolder, Stopped, StopSignals, provenance
from .step import Stepper, autocast_dtype, deterministic_algorithms, warmup_cosine
from .text import class_text_features
from .visualize import attention_snapshot, save_attention_figure

LOGGED = ("total", "sls", "aal", "sim_align", "train_acc")   # window means
CHECKED = ("sls", "aal", "sim_align", "total")   # the term that went bad is named before the sum


@dataclass
class Progress:
    step: int = 0
    best_val: float = -1.0
    best_epoch: Optional[int] = None
    train_seconds: float = 0.0
    last_val: Optional[float] = None      # the last tower's validation accuracy at last_val_step
    last_val_step: int = -1


def step_batches(task, cfg, size, start, stop, ddp, device):
    """(images, labels) on the device for steps start..stop-1: one batch from every training
    domain per step, through one DataLoader (`data/pipeline.py`)."""
    dc = cfg.data
    if dc.batch_size % ddp.world:
        raise RunError(f"data.batch_size {dc.batch_size} must divide by the {ddp.world} ranks")
    kind = resolved_transforms(cfg)
    workers = worker_count(dc.num_workers)
    loader = train_loader(task.train_domains, kind, size, batch_size=dc.batch_size, seed=cfg.seed, start=start,
                          stop=stop, workers=workers, device=device, skip_corrupt=dc.skip_corrupt,
                          rank=ddp.rank, world=ddp.world)
    return DeviceBatches(loader, kind, size, device, num_classes=len(task.classnames))


def finiteness(terms, grad_norm):
    """The checked loss terms and the gradient norm, one device tensor (read a step late). Under
    fp16's loss scaler an overflowing gradient is expected (the scaler skips that step), so
    `grad_norm` is then None and only the terms are checked."""
    values = [getattr(terms, name).detach().float() for name in CHECKED]
    if grad_norm is not None:
        values.append(grad_norm.detach().float())
    return torch.stack(values)


def check_finite(read, checkpoint):
    kept = (f"the last checkpoint ({checkpoint}) is kept" if os.path.exists(checkpoint)
            else "no checkpoint was written yet")
    for name, value in zip(CHECKED, read.values):
        if not math.isfinite(value):
            raise RunError(f"step {read.step}: loss term {name} is not finite ({value}); {kept}")
    if not all(math.isfinite(v) for v in read.values):
        raise RunError(f"step {read.step}: the gradient is not finite (the loss terms were finite); {kept}")


def text_tower_state(clip, cfg):
    """A randomly initialised text tower (model.pretrained null) cannot be rebuilt from a tag:
    its weights travel with the checkpoint, so eval and export need no seed replay."""
    if cfg.model.pretrained is not None:
        return None
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}


def train(cfg: RunConfig, *, max_steps=None, resume=False, overwrite=False, echo=print, quiet=False):
    """Train (or resume) the run of `cfg`; returns the summary (rank 0). `max_steps` stops at
    that absolute step, so a resumed run ends where an unbroken one with the same flag ends.
    `echo` takes the run's console lines (`monitor.py`); `quiet` keeps only the result."""
    try:
        with deterministic_algorithms(cfg.train.deterministic):
            return _train(cfg, max_steps, resume, overwrite, echo, quiet)
    except CorruptImageError as exc:   # also re-raised from a DataLoader worker
        raise RunError(CorruptImageError.one_line(exc)) from None


def _train(cfg, max_steps, resume, overwrite, echo, quiet):
    ddp = distributed.setup()
    device = distributed.resolve_device(cfg.train.device, ddp)
    folder = RunFolder(cfg.output_dir)
    check_model(cfg.model)
    held = folder.holds_run()
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
                            out_proj_mode=cfg.model.out_proj_mode, second_path=cfg.model.second_path)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    lc = cfg.loss
    criterion = AlignCLIPLoss(text["train"], alpha=lc.alpha, epsilon=lc.epsilon,
                              logit_scale=lc.logit_scale or logit_scale(clip), smoothing=lc.smoothing,
                              aloss=lc.aloss, temperature=lc.temperature, align=lc.align, sls=lc.sls)
    optimizer = torch.optim.AdamW(visual.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.total_steps, cfg.train.warmup_steps))
    bma = BetaMovingAverage(visual, cfg.total_steps, beta=cfg.train.bma_beta)
    progress, resumed = Progress(), {}
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
        resumed = state.get("stepper", {})
        if ddp.main:
            folder.truncate_metrics(progress.step)
            echo(f"resumed from step {progress.step}")
    elif resume and held and ddp.main:
        echo(f"no checkpoint at {folder.last}: starting from step 0")

    def state():
        return {"format": FORMAT, "step": progress.step, "config": cfg.to_dict(),
                "visual": visual.state_dict(), "bma": bma.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "stepper": stepper.state_dict(),
                "rng": rng_state(), "progress": dataclasses.asdict(progress), "text": text,
                "classnames": {"train": task.classnames, **{k: v.classnames for k, v in task.eval_sets.items()}},
                "logit_scale": criterion.logit_scale, "template": template,
                "text_tower": text_tower_state(clip, cfg)}

    if ddp.main and cfg.train.attention_images and cfg.loss.align and not os.path.exists(folder.before):
        snapshot = attention_snapshot(model, task, cfg, text["train"], size, device)
        if snapshot is not None:
            save_atomic(snapshot, folder.before)

    # -- the loop --------------------------------------------------------------------------------
    net = model
    if ddp.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def forward(images, labels):   # CLIPood (loss.align false) runs the original path alone
        return criterion(net(images, align=cfg.loss.align), labels)

    if cfg.train.compile:
        forward = torch.compile(forward)
    stop = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    stepper = Stepper(forward, visual.parameters(), optimizer, scheduler, cfg, device,
                      no_sync=net.no_sync if ddp.world > 1 else None)
    stepper.load_state_dict(resumed)
    monitor = Monitor(cfg, folder, task, start=progress.step, stop=stop, main=ddp.main, quiet=quiet, echo=echo)
    dtype = autocast_dtype(cfg.train.precision, device)
    monitor.header(device=device, dtype=f"{'fp32' if dtype is None else str(dtype).split('.')[1]} "
                   f"(train.precision {cfg.train.precision})", notice=random_init_notice(cfg.model))
    evaluator = Evaluator(task, text, cfg, size, device)
    lagged = LaggedReads(device)
    batches = step_batches(task, cfg, size, progress.step, stop, ddp, device)
    window, window_steps, logged = None, 0, {}
    session_steps, session_seconds = 0, 0.0

    def consume(reads):
        for read in reads:
            if read.tag == "finite":
                check_finite(read, folder.last)
                continue
            row = {"step": read.step, **dict(zip(LOGGED, read.values)), **logged.pop(read.step)}
            monitor.window(row, session_steps, session_seconds)

    schedule = Schedule(cfg.train.checkpoint_every, cfg.train.checkpoint_minutes)

    def save(writer):
        """last.pt in the background (rank 0); the loop goes on while it is written."""
        consume(lagged.flush())     # a non-finite step stops the run before it is saved
        if ddp.main:
            writer.save(state(), folder.last)
        schedule.saved()

    with StopSignals() as signals, background_writer() as writer:
        clock, wait_mark, window_start = time.perf_counter(), batches.wait, time.perf_counter()
        for images, labels in batches:
            done = stepper(images, labels)
            terms = done.terms
            lagged.push("finite", progress.step + 1, finiteness(terms, None if done.scaled else done.grad_norm))
            bma.update()
            progress.step += 1
            if session_steps == 0 and ddp.main:   # the optimizer's state now exists: buffers for saving it
                writer.prepare(state(), folder.last)
            now = time.perf_counter()
            progress.train_seconds += now - clock
            session_steps, session_seconds = session_steps + 1, session_seconds + now - clock
            clock = now
            accuracy = (terms.logits.detach().argmax(-1) == labels).float().mean()
            values = torch.stack([*(getattr(terms, k).detach().float() for k in LOGGED[:-1]), accuracy])
            window = values if window is None else window + values
            window_steps += 1
            monitor.advanced(progress.step)

            if progress.step % cfg.train.log_every == 0 or progress.step == stop:
                seconds = max(now - window_start, 1e-9)
                logged[progress.step] = {
                    "lr": scheduler.get_last_lr()[0], "seconds": round(progress.train_seconds, 3),
                    "images_per_s": window_steps * cfg.data.batch_size * len(task.train_domains) / seconds,
                    "data_wait": min(1.0, (batches.wait - wait_mark) / seconds)}
                lagged.push("log", progress.step, ddp.mean(window / window_steps))
                window, window_steps, wait_mark, window_start = None, 0, batches.wait, now
            consume(lagged.ready())
            if cfg.train.select_best and progress.step % cfg.train.iters_per_epoch == 0:
                consume(lagged.flush())
                if ddp.main:
                    val = evaluator.accuracies({"last": visual}, "val")["last"]
                    progress.last_val, progress.last_val_step = val, progress.step
                    if val is not None and val > progress.best_val:
                        progress.best_val = val
                        progress.best_epoch = progress.step // cfg.train.iters_per_epoch
                        writer.save({"visual": visual.state_dict(), "epoch": progress.best_epoch,
                                     "step": progress.step, "val": val}, folder.best)
                    monitor.evaluation(progress.step, {"last": {"val": val}}, evaluator.by_domain)
                ddp.barrier()
                clock = window_start = time.perf_counter()
            if signals.received:
                save(writer)
                writer.wait()
                ddp.barrier()
                monitor.close()
                raise Stopped(signals.received, progress.step, folder.last)
            if ddp.main and schedule.due(progress.step, stop):
                save(writer)
                clock = window_start = time.perf_counter()
        save(writer)
    ddp.barrier()
    monitor.end_bar()

    # -- evaluation: each image decoded once for every tower, no pass made twice ----------------
    summary = None
    if ddp.main:
        towers = {"last": visual, "bma": bma.module}
        known = {}
        if progress.last_val_step == progress.step:
            known[("last", "val")] = progress.last_val
        if os.path.exists(folder.best):
            best = load(folder.best, map_location=device, required=("visual",))
            towers["best"] = copy.deepcopy(bma.module)
            towers["best"].load_state_dict(best["visual"])
            known[("best", "val")] = best.get("val")
        results = evaluator.evaluate(towers, known)
        summary = {"num_classes": len(task.classnames), "steps": progress.step,
                   "seconds_per_step": progress.train_seconds / max(progress.step, 1),
                   "best_epoch": progress.best_epoch, "test_domains": evaluator.test_domains(),
                   **provenance(cfg), **results}
        folder.write_json(folder.summary, summary)
        monitor.evaluation(progress.step, results, evaluator.by_domain, final=True)
        if os.path.exists(folder.before):
            before = load(folder.before, required=("images",))
            after = attention_snapshot(model, task, cfg, text["train"], size, device)
            save_attention_figure(os.path.join(cfg.output_dir, "attention.png"), before, after,
                                  resolved_transforms(cfg), task)
        monitor.result(summary)
    monitor.close()
    ddp.barrier()
    return summary
