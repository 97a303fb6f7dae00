"""Training and evaluation runs (SPEC.md section 8).

Only the image encoder trains (the text encoder is frozen and embeds the class prompts once).
AdamW with a cosine schedule over `epochs × iters_per_epoch` steps, AMP (bf16 on CUDA, fp32 on
the CPU), the model in eval mode while training as the authors do, BMA after every step.
Under `torchrun` the same command trains with DistributedDataParallel: each rank takes its
share of every domain's batch, rank 0 logs and writes checkpoints.
"""
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg
import torch.distributed as dist
from tqdm import tqdm

from .bma import BetaMovingAverage
from .checkpoint import rng_state, save_atomic, set_rng_state
from .config import total_steps
from .data import (CorruptImageError, SampleDataset, StepBatches, build_task, eval_transform,
                   train_transform, write_synthetic)
from .losses import AlignCLIPLoss
from .model import AlignCLIPVisual
from .text import class_text_features
from .visualize import attention_maps, save_attention_figure

open_clip.add_model_config(os.path.join(os.path.dirname(__file__), "model_configs"))


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line for the user."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name, ddp):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RunError("train.device is cuda but CUDA is not available")
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device(name)


def data_root(cfg, output_dir, ddp):
    data = cfg["data"]
    if data["dataset"] == "Synthetic":
        root = data["root"] or os.path.join(output_dir, "data")
        if ddp.main:
            syn = data["synthetic"]
            write_synthetic(root, domains=syn["domains"], classes=syn["classes"],
                            per_class=syn["per_class"], size=syn["image_size"], seed=cfg["seed"])
        ddp.barrier()
        return root
    if not data["root"]:
        raise RunError(f"data.root must name the folder that holds {data['dataset']}")
    return data["root"]


def build_clip(cfg, device):
    m = cfg["model"]
    if m["arch"] not in open_clip.list_models():
        raise RunError(f"model.arch {m['arch']!r} is not an open_clip model; e.g. ViT-B-16, ViT-B-32, "
                       f"ViT-L-14, ViT-H-14, AlignCLIP-Tiny")
    # OpenAI's weights were trained with QuickGELU; open_clip builds e.g. ViT-B-16 with GELU and
    # only warns on the mismatch, so take the activation from the pretrained tag itself.
    tag = get_pretrained_cfg(m["arch"], m["pretrained"]) if m["pretrained"] else {}
    clip = open_clip.create_model(m["arch"], pretrained=m["pretrained"], device=device,
                                  force_quick_gelu=bool(tag.get("quick_gelu", False)))
    clip.eval().requires_grad_(False)
    clip.visual.requires_grad_(True)
    return clip, open_clip.get_tokenizer(m["arch"])


@contextlib.contextmanager
def corrupt_images_as_run_errors():
    """A corrupt image stops the run with one line naming the file, also when a DataLoader
    worker raised it (the worker's re-raise carries the whole traceback in its message)."""
    try:
        yield
    except RuntimeError as exc:
        match = re.search(r"corrupt image: [^\n]*", str(exc))
        if isinstance(exc, CorruptImageError) or match:
            raise RunError(match.group(0) if match else str(exc)) from None
        raise


class Trainer:
    def __init__(self, cfg, output_dir, ddp=None):
        self.cfg = cfg
        self.output_dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.ddp = ddp or setup_distributed()
        self.device = resolve_device(cfg["train"]["device"], self.ddp)
        torch.manual_seed(cfg["seed"])
        root = data_root(cfg, output_dir, self.ddp)
        self.task = build_task(dict(cfg["data"], root=root), cfg["task"], cfg["seed"])
        self.clip, self.tokenizer = build_clip(cfg, self.device)
        visual = self.clip.visual
        self.image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        m = cfg["model"]
        self.model = AlignCLIPVisual(visual, dual_layers=m["dual_layers"], aal_layers=m["aal_layers"],
                                     out_proj_mode=m["out_proj_mode"])
        self.text = class_text_features(self.clip, self.tokenizer, self.task.classnames, m["template"],
                                        self.device)
        lc = cfg["loss"]
        self.loss_fn = AlignCLIPLoss(self.text, alpha=lc["alpha"], logit_scale=lc["logit_scale"],
                                     epsilon=lc["epsilon"], smoothing=lc["smoothing"], aloss=lc["aloss"],
                                     temperature=lc["temperature"], align=lc["align"])
        self.total = total_steps(cfg)
        tc = cfg["train"]
        self.optimizer = torch.optim.AdamW(visual.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total)
        self.bma = BetaMovingAverage(visual, self.total, beta=tc["bma_beta"])
        self.step = 0
        self.net = self.model
        if self.ddp.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.checkpoint_path = os.path.join(output_dir, "checkpoints", "last.pt")

    # -- checkpoints -------------------------------------------------------------------
    def state(self):
        return {"model": self.model.visual.state_dict(), "bma": self.bma.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "rng": rng_state(), "config": self.cfg}

    def save(self):
        if self.ddp.main:
            save_atomic(self.state(), self.checkpoint_path)
        self.ddp.barrier()

    def resume(self):
        if not os.path.exists(self.checkpoint_path):
            print(f"no checkpoint at {self.checkpoint_path}: starting from step 0", file=sys.stderr)
            return
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.model.visual.load_state_dict(state["model"])
        self.bma.load_state_dict(state["bma"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    # -- data ------------------------------------------------------------------------------
    def batches(self, stop):
        dc = self.cfg["data"]
        if dc["batch_size"] % self.ddp.world:
            raise RunError(f"data.batch_size {dc['batch_size']} must divide by the {self.ddp.world} ranks")
        loaders = []
        for d, samples in enumerate(self.task.train_domains):
            dataset = SampleDataset(samples, train_transform(self.image_size), dc["skip_corrupt"])
            sampler = StepBatches(len(samples), dc["batch_size"], self.cfg["seed"], d, self.step, stop,
                                  self.ddp.rank, self.ddp.world)
            loaders.append(torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                                       num_workers=dc["num_workers"],
                                                       pin_memory=self.device.type == "cuda",
                                                       persistent_workers=False))
        for parts in zip(*loaders):
            images = torch.cat([p[0] for p in parts]).to(self.device, non_blocking=True)
            labels = torch.cat([p[1] for p in parts]).to(self.device, non_blocking=True)
            yield images, labels

    # -- one step ------------------------------------------------------------------------
    def train_step(self, images, labels):
        amp = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            terms = self.loss_fn(self.net(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self._check_finite(terms)
        self.optimizer.step()
        self.scheduler.step()
        self.bma.update()
        self.step += 1
        return terms

    def _check_finite(self, terms):
        """One host sync per step: the loss terms and the gradient norm checked together."""
        names = ("sls", "aal", "sim_align", "total")
        values = [getattr(terms, name).detach().float() for name in names]
        grads = [p.grad for p in self.model.visual.parameters() if p.grad is not None]
        if grads:
            values.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float())
        finite = torch.isfinite(torch.stack(values)).tolist()
        keep = f"the last checkpoint ({self.checkpoint_path}) is kept"
        for name, value, ok in zip(names, values, finite):
            if not ok:
                raise RunError(f"step {self.step + 1}: loss term {name} is not finite ({value.item()}); {keep}")
        if not all(finite):
            raise RunError(f"step {self.step + 1}: the gradient is not finite (loss terms were finite); {keep}")

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, visual, eval_set):
        if not eval_set.samples:
            return None
        text = class_text_features(self.clip, self.tokenizer, eval_set.classnames,
                                   self.cfg["model"]["template"], self.device)
        encoder = AlignCLIPVisual(visual, dual_layers=0, aal_layers=())
        loader = torch.utils.data.DataLoader(
            SampleDataset(eval_set.samples, eval_transform(self.image_size), self.cfg["data"]["skip_corrupt"]),
            batch_size=self.cfg["train"]["eval_batch_size"], num_workers=self.cfg["data"]["num_workers"])
        correct = 0
        for images, labels in loader:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                feats = encoder.encode_image(images.to(self.device)).float()
            correct += int(((feats @ text.T).argmax(1).cpu() == labels).sum())
        return 100.0 * correct / len(eval_set.samples)

    def evaluate(self):
        results = {}
        for tag, visual in (("last", self.model.visual), ("bma", self.bma.module)):
            results[tag] = {name: self.accuracy(visual, es) for name, es in self.task.eval_sets.items()}
        return results

    def attention_snapshot(self):
        """CLS attention and target G for a few validation images, one class after another."""
        es = self.task.eval_sets["val"]   # labelled with the training classes in every task
        n = self.cfg["train"]["attention_images"]
        if not es.samples or n == 0 or not self.model.aal_layers:
            return None
        by_class = {}
        for i, s in enumerate(es.samples):
            by_class.setdefault(s.label, []).append(i)
        queues = list(by_class.values())
        picks = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)][:n]
        dataset = SampleDataset(es.samples, eval_transform(self.image_size), self.cfg["data"]["skip_corrupt"])
        images = torch.stack([dataset[i][0] for i in picks]).to(self.device)
        labels = torch.tensor([es.samples[i].label for i in picks], device=self.device)
        maps = attention_maps(self.model, images, labels, self.text, self.cfg["loss"]["temperature"])
        return {"images": images.cpu(), "attn": maps[0], "target": maps[1]}


def _logger(output_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(output_dir, "tensorboard"))
    except Exception:  # tensorboard is optional
        return None


def train(cfg, output_dir=None, max_steps=None, resume=False):
    """Train; returns the summary dict (rank 0) after writing every output under output_dir."""
    output_dir = output_dir or cfg["output_dir"]
    with corrupt_images_as_run_errors():
        return _train(Trainer(cfg, output_dir), cfg, output_dir, max_steps, resume)


def _train(trainer, cfg, output_dir, max_steps, resume):
    ddp = trainer.ddp
    if resume:
        trainer.resume()
    before_path = os.path.join(output_dir, "checkpoints", "attention_before.pt")
    if ddp.main and not os.path.exists(before_path):
        before = trainer.attention_snapshot()
        if before is not None:
            save_atomic(before, before_path)
    stop = trainer.total if max_steps is None else min(trainer.total, trainer.step + max_steps)
    writer = _logger(output_dir) if ddp.main else None
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    start = time.time()
    log_every = cfg["train"]["log_every"]
    progress = tqdm(total=stop - trainer.step, disable=not ddp.main, desc="train", dynamic_ncols=True)
    try:
        for images, labels in trainer.batches(stop):
            terms = trainer.train_step(images, labels)
            progress.update(1)
            if trainer.step % log_every == 0 or trainer.step == stop:
                row = {"step": trainer.step, "loss": terms.total.item(), "sls": terms.sls.item(),
                       "aal": terms.aal.item(), "sim_align": terms.sim_align.item(),
                       "lr": trainer.scheduler.get_last_lr()[0], "seconds": round(time.time() - start, 3)}
                progress.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "sls", "aal", "sim_align")})
                if ddp.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if writer:
                        for key in ("loss", "sls", "aal", "sim_align", "lr"):
                            writer.add_scalar(f"train/{key}", row[key], trainer.step)
            if trainer.step % cfg["train"]["checkpoint_every"] == 0 and trainer.step < stop:
                trainer.save()
    finally:
        progress.close()
    trainer.save()
    summary = None
    if ddp.main:
        results = trainer.evaluate()
        summary = {"num_classes": len(trainer.task.classnames), "steps": trainer.step,
                   "seconds": round(time.time() - start, 3), **results}
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        after = trainer.attention_snapshot()
        if after is not None and os.path.exists(before_path):
            before = torch.load(before_path, weights_only=False)
            save_attention_figure(os.path.join(output_dir, "attention.png"), before["images"],
                                  (before["attn"], before["target"]), (after["attn"], after["target"]))
        if writer:
            for tag, accs in results.items():
                for name, acc in accs.items():
                    if acc is not None:
                        writer.add_scalar(f"{tag}/{name}", acc, trainer.step)
            writer.close()
    ddp.barrier()
    return summary


def evaluate_checkpoint(cfg, checkpoint, output_dir=None):
    """Accuracies of a checkpoint's last and BMA models; written to output_dir/eval.json."""
    output_dir = output_dir or cfg["output_dir"]
    if not os.path.exists(checkpoint):
        raise RunError(f"checkpoint {checkpoint} does not exist")
    with corrupt_images_as_run_errors():
        trainer = Trainer(cfg, output_dir, Dist())
        state = torch.load(checkpoint, map_location=trainer.device, weights_only=False)
        trainer.model.visual.load_state_dict(state["model"])
        trainer.bma.module.load_state_dict(state["bma"]["module"])
        results = {"checkpoint": os.path.abspath(checkpoint), "steps": int(state["step"]),
                   **trainer.evaluate()}
    with open(os.path.join(output_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results

