"""Run under torchrun by test_ddp.py: trains the tiny config, then saves this rank's parameters."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from runs import tiny_config  # noqa: E402

from alignclip.train import Trainer, _train  # noqa: E402


def main(data_root, out):
    cfg = tiny_config(data_root, train={"attention_images": 0})
    trainer = Trainer(cfg, out)
    _train(trainer, cfg, out, None, False)
    rank = int(os.environ.get("RANK", "0"))
    state = {"model": trainer.model.visual.state_dict(), "bma": trainer.bma.module.state_dict()}
    torch.save(state, os.path.join(out, f"params_rank{rank}.pt"))
    if trainer.ddp.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
