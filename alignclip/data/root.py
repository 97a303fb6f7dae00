"""Where a run's data lives: `data.root`, or for the synthetic demo sets (`data.dataset:
Synthetic`; in CoOp's ImageNet layouts for `task: imagenet_shift`) a folder under the run's
output folder, written there (by the main process) on first use."""
import dataclasses
import os

from .synthetic import write_synthetic, write_synthetic_imagenet


def data_config(cfg, ddp):
    """cfg.data with its root resolved; the synthetic demo set is written under the run folder
    on first use."""
    data = cfg.data
    if data.dataset != "Synthetic":
        return data
    root = data.root or os.path.join(cfg.output_dir, "data")
    if ddp.main:
        s = data.synthetic
        if cfg.task == "imagenet_shift":
            write_synthetic_imagenet(root, classes=s.classes, per_class=s.per_class, size=s.image_size, seed=cfg.seed)
        else:
            write_synthetic(root, domains=s.domains, classes=s.classes, per_class=s.per_class,
                            size=s.image_size, seed=cfg.seed)
    ddp.barrier()
    return dataclasses.replace(data, root=root)
