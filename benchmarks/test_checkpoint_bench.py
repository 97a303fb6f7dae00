"""checkpoint-save: what a checkpoint costs the training loop, for a run's whole state (image
tower, BMA tower, AdamW moments: four copies of the tower's weights, 1.4 GB at ViT-B/16; a
width-512 ViT/16 tower on the CPU, 0.61 GB, whose save takes over a second here):
- `sync`: `checkpoint.save_atomic` on the loop's thread (torch.save, fsync, rename): what the
  loop used to wait for;
- `background`: `CheckpointWriter.save`, the part the loop waits for: the copy into host
  buffers kept from save to save, and handing it to the writer thread (the write itself is
  waited for between rounds, untimed).
The budget: `background` ≤ 10% of `sync`."""
import copy

import pytest
import torch
from open_clip.transformer import VisionTransformer

from alignclip.checkpoint import save_atomic
from alignclip.checkpoint_writer import CheckpointWriter
from conftest import CUDA, DEVICE, measure

WIDTH, LABEL = (768, "ViT-B/16 state 1.4 GB") if CUDA else (512, "ViT/16 width 512 state 0.61 GB (CPU)")


@pytest.fixture(scope="module")
def state():
    tower = VisionTransformer(224, 16, WIDTH, 12, WIDTH // 64, 4.0, output_dim=512).to(DEVICE)
    optimizer = torch.optim.AdamW(tower.parameters())
    for p in tower.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    bma = copy.deepcopy(tower)
    return {"visual": tower.state_dict(), "bma": bma.state_dict(), "optimizer": optimizer.state_dict()}


@pytest.mark.parametrize("provider", ["sync", "background"])
def test_checkpoint_save(benchmark, provider, state, tmp_path):
    path = str(tmp_path / "last.pt")
    nbytes = sum(t.numel() * t.element_size() for part in ("visual", "bma") for t in state[part].values()) * 2
    if provider == "sync":
        measure(benchmark, lambda: save_atomic(state, path), group=f"checkpoint-save {LABEL}", provider=provider,
                rounds=3, device_timed=False, state_bytes=nbytes)
        return
    writer = CheckpointWriter()
    writer.prepare(state, path)
    writer.wait()
    measure(benchmark, lambda: writer.save(state, path), group=f"checkpoint-save {LABEL}", provider=provider,
            rounds=3, setup=writer.wait, device_timed=False, state_bytes=nbytes)
    writer.wait()
