"""A tiny training configuration for tests: synthetic data, the tiny ViT, a handful of steps."""
from alignclip.config import load_config

TINY = [
    "task=domain_shift", "data.dataset=Synthetic", "data.targets=[3]", "data.batch_size=4",
    "data.num_workers=0", "data.transforms=coop",
    "data.synthetic={domains: 4, classes: 3, per_class: 10, image_size: 32}",
    "model.arch=AlignCLIP-Tiny", "model.pretrained=null", "model.dual_layers=2", "model.aal_layers=[0, 1]",
    "train.epochs=2", "train.iters_per_epoch=3", "train.lr=1e-3", "train.log_every=1",
    "train.checkpoint_every=3", "train.eval_batch_size=64", "train.device=cpu", "train.attention_images=2",
    "loss.logit_scale=100.0",
]


def tiny_config(data_root, output_dir, *overrides):
    """The tiny run writing to `output_dir`, its synthetic data under `data_root`."""
    return load_config(None, [*TINY, f"data.root={data_root}", f"output_dir={output_dir}", *overrides])
