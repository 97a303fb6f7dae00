"""The input pipeline: the authors' preprocessing by default, its tensors equivalent to the
authors' `Compose` for the same random draws (PSNR, and at most a couple of levels), DCT-scaled
decoding of large JPEGs, DomainBed's stock jitter equivalent to its PIL ColorJitter, one loader
over all domains, evaluation that decodes each image once, unreadable files named in words,
activation checkpointing, and (on a GPU) a training loop with no host sync."""
import math
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from alignclip.data import StepBatches, collate, preprocessing, reference_eval, reference_train
from alignclip.data.decode import dct_scale, read_image
from alignclip.data.device_transforms import DeviceTransform
from alignclip.data.pipeline import ImageItems, StepSampler
from alignclip.data.samples import Sample
from alignclip.data.synthetic import photo_like
from tiny_run import tiny_config

CPU = torch.device("cpu")
SIZES = [(227, 227), (500, 375), (180, 260), (1000, 750)]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Generated photo-like JPEGs (quality 90) at PACS's 227x227, DomainNet's 500x375, a portrait
    size and a large one whose crops decode with DCT scaling."""
    root = tmp_path_factory.mktemp("jpegs")
    files = {}
    for w, h in SIZES:
        files[(w, h)] = []
        for i in range(4):
            path = root / f"{w}x{h}-{i}.jpg"
            photo_like(w, h, 10 * w + i).save(path, quality=90)
            files[(w, h)].append(str(path))
    return files


def _ours(files, kind, seeds=None):
    items = ImageItems([Sample(f, 0) for f in files], kind, 224)
    images, params, _, _ = collate([items[(i, s) if seeds else i] for i, s in enumerate(seeds or [None] * len(files))])
    return DeviceTransform(preprocessing(kind), CPU)(images, params), params


def _levels(x, kind):
    spec = preprocessing(kind)
    return (x * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)) * 255


def psnr(a, b):
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def _theirs(files, seeds, kind, train=True):
    out = []
    for f, s in zip(files, seeds):
        torch.manual_seed(s)
        compose = reference_train(kind, 224) if train else reference_eval(kind, 224)
        out.append(compose(Image.open(f).convert("RGB")))
    return torch.stack(out)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_authors_transform_is_their_compose_within_a_level_or_two(jpegs, size):
    """Same draws, same crop boxes; the resize is torchvision's antialiased uint8 bilinear (or,
    for large JPEGs, DCT scaling then PIL's resize): PSNR >= 40 dB is the contract."""
    files, seeds = jpegs[size], [11, 12, 13, 14]
    for train in (True, False):
        ours, params = _ours(files, "alignclip", seeds if train else None)
        theirs = _theirs(files, seeds, "alignclip", train)
        a, b = _levels(ours, "alignclip"), _levels(theirs, "alignclip")
        assert psnr(a, b) >= 40 and (a - b).abs().max() <= 2.5 + 16 * (size == (1000, 750)), (train, psnr(a, b))
        if size != (1000, 750):
            assert psnr(a, b) >= 50, (train, psnr(a, b))


def test_large_jpeg_crops_decode_with_dct_scaling(jpegs):
    image = read_image(jpegs[(1000, 750)][0])
    assert image.jpeg == (750, 1000, 3)
    assert dct_scale(image, 700, 900, 224, 224) == 2 and dct_scale(image, 460, 500, 224, 224) == 2
    assert dct_scale(image, 900, 900, 224, 224) == 4 and dct_scale(image, 440, 900, 224, 224) == 1
    assert dct_scale(read_image(jpegs[(227, 227)][0]), 227, 227, 100, 100) == 2


def test_the_stock_domainbed_transform_draws_theirs_and_is_equivalent_to_pil(jpegs):
    files, seeds = jpegs[(227, 227)], [3, 4, 5, 6]
    ours, params = _ours(files, "domainbed", seeds)
    theirs = _theirs(files, seeds, "domainbed")
    # PIL's ColorJitter rounds to uint8 after every op; ours is torchvision's tensor jitter.
    assert psnr(_levels(ours, "domainbed"), _levels(theirs, "domainbed")) >= 40
    eval_ours, _ = _ours(files, "domainbed")
    eval_theirs = _theirs(files, [0] * 4, "domainbed", train=False)
    assert psnr(_levels(eval_ours, "domainbed"), _levels(eval_theirs, "domainbed")) >= 50


def test_unreadable_files_are_named_in_words(tmp_path, jpegs, capsys):
    from alignclip.data.decode import CorruptImageError
    from alignclip.data.pipeline import DeviceBatches, eval_loader

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    good = open(jpegs[(227, 227)][0], "rb").read()
    (tmp_path / "cut.jpg").write_bytes(good[:len(good) // 2])
    reasons = {"empty.jpg": "empty file", "text.jpg": "not an image", "cut.jpg": "truncated"}
    for name, reason in reasons.items():
        with pytest.raises(CorruptImageError, match=f"unreadable image .*{name}: {reason}"):
            ImageItems([Sample(str(tmp_path / name), 0)], "alignclip", 224)[0]
    samples = [Sample(str(tmp_path / n), 0) for n in reasons] + [Sample(jpegs[(227, 227)][0], 0)]
    loader = eval_loader(samples, "alignclip", 224, batch_size=4, workers=0, device=CPU, skip_corrupt=True)
    for _ in range(2):      # a second evaluation says nothing more
        assert [len(y) for _, y in DeviceBatches(loader, "alignclip", 224, CPU)] == [4]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    for line, (name, reason) in zip(lines, reasons.items()):
        assert line.startswith("skipped ") and name in line and reason in line and "Warning" not in line, line


def test_one_loader_batch_is_every_domains_step_batch_in_order():
    sampler = StepSampler([10, 7, 5], batch_size=4, seed=3, start=2, stop=5)
    for step, batch in zip(range(2, 5), sampler):
        want = []
        for d, (n, offset) in enumerate(zip([10, 7, 5], [0, 10, 17])):
            want += [(offset + i, s) for i, s in StepBatches(n, 4, 3, d, 0, 9).batch(step)]
        assert batch == want
    assert len(sampler) == 3


def test_a_consumer_that_stops_early_stops_the_helper_thread():
    from alignclip.data.pipeline import _received

    before = threading.active_count()
    batches = _received(iter(range(100)), depth=2)
    assert next(batches) == 0
    batches.close()                       # the training step raised: the generator is closed
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_pipeline_command_refuses_bad_counts_in_one_line(capsys):
    from alignclip import cli

    for flag, value in (("--steps", "1"), ("--workers", "-1")):
        assert cli.main(["pipeline", "--config", "configs/demo.yaml", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} must be >= ") and "\n" not in err, err
    with pytest.raises(ValueError, match="kind must be one of alignclip, coop, domainbed"):
        ImageItems([], "imagenet", 224)


def test_auto_resolves_to_the_authors_preprocessing_per_data_set():
    for config, kind in (("configs/pacs.yaml", "alignclip"), ("configs/in_the_wild_domain_net.yaml", "alignclip"),
                         ("configs/open_class.yaml", "coop")):
        out = subprocess.run([sys.executable, "-m", "alignclip", "config", "--config", config],
                             capture_output=True, text=True, check=True).stdout
        assert f"# data.transforms auto resolves to {kind}" in out, out[-400:]
    out = subprocess.run([sys.executable, "-m", "alignclip", "config", "--config", "configs/pacs.yaml", "--set",
                          "data.transforms=domainbed"], capture_output=True, text=True, check=True).stdout
    assert "transforms: domainbed" in out and "resolves" not in out


def test_final_evaluation_decodes_each_image_once_and_repeats_no_pass(tmp_path, torch_path, monkeypatch):
    import collections

    from alignclip.data import pipeline
    from alignclip.train import train

    loads = collections.Counter()
    real = pipeline.read_image

    def counted(path):
        loads[path] += 1
        return real(path)

    monkeypatch.setattr(pipeline, "read_image", counted)
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", "train.attention_images=0")
    summary = train(cfg)
    from alignclip.data import build_task
    from alignclip.data.root import data_config
    from alignclip.distributed import Dist

    task = build_task(data_config(cfg, Dist()), cfg.task, cfg.seed)
    epochs = cfg.train.epochs
    assert {loads[s.path] for s in task.eval_sets["test"].samples} == {1}          # 3 towers, one decode
    # val: once per epoch for the last tower, once at the end for BMA (last and best are known)
    assert {loads[s.path] for s in task.eval_sets["val"].samples} == {epochs + 1}
    assert set(summary) >= {"last", "bma", "best"} and summary["last"]["val"] is not None


def _tiny_clip():
    from alignclip.clip import build_architecture

    return build_architecture(tiny_config("unused", "unused").model).visual


def test_checkpointing_gives_the_same_values_and_gradients_on_both_paths():
    from alignclip import AlignCLIPVisual

    torch.manual_seed(0)
    visual = _tiny_clip()
    images = torch.randn(3, 3, 32, 32)
    results = []
    for enable in (False, True):
        visual.zero_grad(set_to_none=True)
        model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 1))
        visual.set_grad_checkpointing(enable)         # the tower's own flag is what is honoured
        out = model(images)
        (out.tokens.square().sum() + out.tokens_dv.sum() + out.cls_attn.square().sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}))
    (plain, g_plain), (ckpt, g_ckpt) = results
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_ckpt[name], rtol=1e-6, atol=1e-7, msg=name)


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_checkpointed_alignclip_visual_saves_within_1_5x_of_open_clips_checkpointed_tower(torch_path):
    import open_clip

    from alignclip import AlignCLIPVisual

    visual = open_clip.create_model("ViT-B-32").visual
    visual.set_grad_checkpointing(True)
    images = torch.randn(4, 3, 224, 224)
    theirs, _ = _saved_bytes(lambda: visual(images))
    model = AlignCLIPVisual(visual)
    ours, _ = _saved_bytes(lambda: model(images))
    visual.set_grad_checkpointing(False)
    plain, _ = _saved_bytes(lambda: model(images))
    assert ours <= 1.5 * theirs, (ours / 2 ** 20, theirs / 2 ** 20)
    assert plain > 4 * ours


@pytest.mark.gpu
def test_training_steps_with_the_data_loader_make_no_host_sync(tmp_path):
    from alignclip import train as train_module

    warm = tiny_config(tmp_path / "data", tmp_path / "warm", "train.device=cuda", "train.attention_images=0",
                       "train.select_best=false", "data.num_workers=2")
    train_module.train(warm, max_steps=2)      # compiles and autotunes every kernel in bf16 first
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", "train.device=cuda", "train.attention_images=0",
                      "train.select_best=false", "data.num_workers=2", "train.checkpoint_every=1000",
                      "train.epochs=4", "train.log_every=2")
    real_batches, real_flush = train_module.step_batches, train_module.LaggedReads.flush

    class Checked:
        """The loop's batches, with sync-debug errors on from the first batch to the first flush
        (the final checkpoint's, which may wait for the device)."""
        def __init__(self, *args):
            self.inner = real_batches(*args)

        @property
        def wait(self):
            return self.inner.wait

        def __iter__(self):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            yield from self.inner

    def flush(self):
        torch.cuda.set_sync_debug_mode(0)
        return real_flush(self)

    train_module.step_batches, train_module.LaggedReads.flush = Checked, flush
    try:
        assert train_module.train(cfg, max_steps=10)["steps"] == 10
    finally:
        train_module.step_batches, train_module.LaggedReads.flush = real_batches, real_flush
        torch.cuda.set_sync_debug_mode(0)
