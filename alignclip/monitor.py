"""What a run shows and records while it works.

On the console: the run's header (model, data set, domains with their image counts, steps,
device, precision, output folder); on a terminal a tqdm bar (step/total, epoch, loss, images/s,
data-wait share, ETA), otherwise one plain line per `train.log_every` steps with the same
fields; a line per evaluation with each source domain's validation accuracy and the best so
far; the result table at the end. `quiet` keeps only the result (errors are raised, not said).

On disk, beside the console: `metrics.jsonl` rows (training windows: the window's mean of every
loss term and of the train accuracy, lr, images/s, data-wait share; evaluation rows: the set,
the tower, the accuracy and one per domain), the same scalars in TensorBoard or Weights &
Biases (`train.logger`), and `curves.png` (loss terms and accuracies against steps, per
domain), redrawn at every evaluation.
"""
import os
import sys

from .data.samples import seed_hash

CURVES = ("total", "sls", "aal", "sim_align")


def clock(seconds):
    """h:mm:ss, for ETAs."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Backend:
    """TensorBoard or wandb scalars (or nothing) under one `scalars(values, step)` call."""

    def __init__(self, cfg, folder, say):
        self.kind, self.writer = cfg.train.logger, None
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                say("train.logger is tensorboard but tensorboard is not installed (pip install "
                    "'alignclip-kernels[tensorboard]'); logging to metrics.jsonl only")
                self.kind = "none"
                return
            self.writer = SummaryWriter(os.path.join(folder.path, "tensorboard"))
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                say("train.logger is wandb but wandb is not installed (pip install 'alignclip-kernels[wandb]'); "
                    "logging to metrics.jsonl only")
                self.kind = "none"
                return
            # one wandb run per run folder, continued on resume
            run_id = f"{seed_hash(os.path.abspath(folder.path)):08x}"
            self.writer = wandb.init(project=cfg.train.wandb_project, name=os.path.basename(folder.path.rstrip("/")),
                                     id=run_id, resume="allow", dir=folder.path, config=cfg.to_dict())

    def scalars(self, values, step):
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        elif self.kind == "wandb":
            self.writer.log(values, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()


class Monitor:
    def __init__(self, cfg, folder, task, *, start, stop, main, quiet=False, echo=print, stream=None):
        self.cfg, self.folder, self.task = cfg, folder, task
        self.start, self.stop, self.main, self.quiet = start, stop, main, quiet
        self.echo = echo
        self.stream = stream or sys.stderr
        self.bar = None
        self.backend = Backend(cfg, folder, self.say) if main else None
        self.best = None

    # -- console -------------------------------------------------------------------------------
    def say(self, line, always=False):
        if not self.main or (self.quiet and not always):
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.echo(line)

    def header(self, *, device, dtype, notice=None):
        cfg, task = self.cfg, self.task
        sources = ", ".join(f"{name} ({len(d)})" for name, d in zip(task.domain_names, task.train_domains))
        sets = ", ".join(f"{name} {len(s.samples)}" for name, s in task.eval_sets.items())
        targets = [d for name, s in task.eval_sets.items() if name != "val" for d, _ in s.domains]
        self.say(f"AlignCLIP run: {cfg.model.arch} ({cfg.model.pretrained or 'random weights'}) on "
                 f"{cfg.data.dataset} ({cfg.task.replace('_', ' ')}), {len(task.classnames)} classes")
        self.say(f"  train on: {sources}" + (f"; test on: {', '.join(dict.fromkeys(targets))}" if targets else ""))
        self.say(f"  eval images: {sets}")
        self.say(f"  steps {self.start}..{self.stop} of {cfg.total_steps} ({cfg.train.epochs} epochs x "
                 f"{cfg.train.iters_per_epoch}), batch {cfg.data.batch_size} a domain"
                 + (f" in {cfg.train.accumulate} micro-batches" if cfg.train.accumulate > 1 else "")
                 + f", {device}, {dtype}")
        self.say(f"  output: {self.folder.path}")
        if notice:
            self.say(notice, always=True)
        if self.main and not self.quiet and _is_terminal(self.stream) and self.stop > self.start:
            from tqdm import tqdm

            self.bar = tqdm(total=self.stop, initial=self.start, file=self.stream, unit="step",
                            dynamic_ncols=True, leave=True)

    def advanced(self, step):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def _epoch(self, step):
        return f"{min(step // self.cfg.train.iters_per_epoch + 1, self.cfg.train.epochs)}/{self.cfg.train.epochs}"

    # -- training windows ------------------------------------------------------------------------
    def window(self, row, elapsed_steps, elapsed_s):
        """A logged training window (the row metrics.jsonl gets)."""
        if not self.main:
            return
        self.folder.log(row)
        self.backend.scalars({f"train/{k}": v for k, v in row.items() if k != "step"}, row["step"])
        eta = (self.stop - row["step"]) * elapsed_s / max(elapsed_steps, 1)
        if self.bar is not None:
            self.bar.set_postfix_str(f"epoch {self._epoch(row['step'])} · loss {row['total']:.4f} · "
                                     f"{row['images_per_s']:.0f} img/s · data wait {100 * row['data_wait']:.0f}%")
        else:
            self.say(f"step {row['step']}/{self.stop} (epoch {self._epoch(row['step'])}) · loss {row['total']:.4f} "
                     f"(sls {row['sls']:.4f}, aal {row['aal']:.4f}, sim {row['sim_align']:.4f}) · "
                     f"train acc {100 * row['train_acc']:.1f}% · {row['images_per_s']:.0f} img/s · "
                     f"data wait {100 * row['data_wait']:.0f}% · ETA {clock(eta)}")

    # -- evaluation ------------------------------------------------------------------------------
    def evaluation(self, step, results, by_domain, final=False):
        """Rows (and scalars) of {tower: {set: accuracy}} with {(tower, set): {domain: acc}}."""
        if not self.main:
            return
        for tower, accs in results.items():
            for name, acc in accs.items():
                if (not isinstance(acc, (float, int)) and acc is not None) or name.endswith("_mean"):
                    continue
                domains = by_domain.get((tower, name)) or {}
                self.folder.log({"step": step, "eval": name, "tower": tower, "accuracy": acc, "domains": domains,
                                 **({"final": True} if final else {})})
                scalars = {f"eval/{name}/{tower}": acc} if acc is not None else {}
                scalars.update({f"eval/{name}/{tower}/{d}": v for d, v in domains.items() if v is not None})
                self.backend.scalars(scalars, step)
        if not final and "last" in results:
            val = results["last"].get("val")
            if val is not None and (self.best is None or val > self.best[0]):
                self.best = (val, step)
            domains = by_domain.get(("last", "val")) or {}
            parts = ", ".join(f"{d} {v:.2f}" for d, v in domains.items() if v is not None)
            best = f" · best {self.best[0]:.2f} at step {self.best[1]}" if self.best else ""
            self.say(f"eval step {step} (epoch {self._epoch(step - 1)}): val "
                     + (f"{parts} (all {val:.2f})" if parts else "–" if val is None else f"{val:.2f}") + best)
        self.curves()

    def curves(self):
        """curves.png from metrics.jsonl: loss terms, then train and validation accuracy per domain."""
        rows = self.folder.rows() if self.main else []
        if not rows:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [r for r in rows if "eval" not in r]
        evals = [r for r in rows if r.get("eval") == "val" and r.get("tower") == "last"]
        fig = Figure(figsize=(10, 3.6))
        FigureCanvasAgg(fig)
        loss_ax, acc_ax = fig.subplots(1, 2)
        for key in CURVES:
            if any(key in r for r in train):
                loss_ax.plot([r["step"] for r in train], [r[key] for r in train], label=key, linewidth=1)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("loss (window mean)")
        loss_ax.set_yscale("symlog", linthresh=1e-3)
        loss_ax.set_title("loss terms", fontsize=9)
        if train:
            loss_ax.legend(fontsize=7)
        acc_ax.plot([r["step"] for r in train], [100 * r["train_acc"] for r in train], label="train (batch)",
                    color="#bbbbbb", linewidth=1)
        if evals:
            acc_ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="val (all sources)",
                        color="black", linewidth=1.5)
            for domain in dict.fromkeys(d for r in evals for d in r["domains"]):
                points = [(r["step"], r["domains"][domain]) for r in evals if r["domains"].get(domain) is not None]
                acc_ax.plot(*zip(*points), ".--", label=f"val {domain}", linewidth=1)
        acc_ax.set_xlabel("step")
        acc_ax.set_ylabel("accuracy (%)")
        acc_ax.set_title("accuracy (last tower)", fontsize=9)
        acc_ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = os.path.join(self.folder.path, "curves.tmp.png")
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, os.path.join(self.folder.path, "curves.png"))

    # -- the end ---------------------------------------------------------------------------------
    def end_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self.end_bar()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def result(self, summary):
        """The result table: a row per tower, a column per evaluation set (and target domain)."""
        if not self.main:
            return
        self.say(result_table(summary, f"result after {summary['steps']} steps ({self.folder.summary}):"),
                 always=True)


def result_table(summary, heading):
    """A row per tower (zero-shot, last, BMA, best) of a summary or an evaluation, a column per
    evaluation set and, for a set over several target domains, per domain; the test sets' image
    counts under it. `train` prints it at the end of a run, `eval` for a checkpoint."""
    towers = [t for t in ("zero_shot", "last", "bma", "best") if t in summary]
    first = summary[towers[0]]
    sets = [k for k, v in first.items() if (isinstance(v, float) or v is None) and not k.endswith("_mean")]
    domains = {name: list(first.get(f"{name}_domains", {})) for name in sets}
    head = ["tower"] + [c for name in sets for c in [name, *(f"{name} {d}" for d in domains[name])]]
    lines = [heading, "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for tower in towers:
        accs = summary[tower]
        cells = [tower.replace("_", "-")]
        for name in sets:
            cells.append(_pct(accs.get(name)))
            cells += [_pct(accs.get(f"{name}_domains", {}).get(d)) for d in domains[name]]
        lines.append("| " + " | ".join(cells) + " |")
    counts = "; ".join(f"{name}: " + ", ".join(f"{d['domain']} {d['images']} images" for d in ds)
                       for name, ds in summary.get("test_domains", {}).items())
    if counts:
        lines.append(counts)
    return "\n".join(lines)


def _pct(value):
    return "–" if value is None else f"{value:.2f}"


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
