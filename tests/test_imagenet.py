"""ImageNet under distribution shift on generated folders in CoOp's layouts: n shots a class
drawn by seed, model selection on held-out training images only, ImageNet-A and -R scored
among their own classes (read from the folders), V2 by label index, missing shifted sets left
out, the table with CLIPood's columns from `train` + `sweep`."""
import json
import os
import shutil

import pytest

from alignclip.data import DataError, build_task
from alignclip.data.synthetic import SHAPES, write_synthetic_imagenet
from alignclip.data.tasks import HELD_OUT
from tiny_run import tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(write_synthetic_imagenet(str(tmp_path_factory.mktemp("coop")), classes=5, per_class=24, size=24))


def _task(root, shots=4, seed=0):
    cfg = tiny_config(root, "unused", "task=imagenet_shift", f"data.shots={'null' if shots is None else shots}")
    return build_task(cfg.data, cfg.task, seed)


def test_shots_are_drawn_per_class_by_seed_and_model_selection_never_sees_a_test_image(root):
    task = _task(root)
    by_class = {}
    for s in task.train_domains[0]:
        by_class.setdefault(s.label, []).append(s.path)
    assert sorted(by_class) == list(range(5)) and {len(v) for v in by_class.values()} == {4}
    assert task.classnames == SHAPES[:5]
    val = {s.path for s in task.eval_sets["val"].samples}
    assert len(val) == 5 * HELD_OUT and not val & {s.path for s in task.train_domains[0]}
    assert all(os.path.join("imagenet", "images", "train") in p for p in val)
    tests = {s.path for name, e in task.eval_sets.items() if name != "val" for s in e.samples}
    assert not val & tests
    again, other = _task(root), _task(root, seed=1)
    assert [s.path for s in again.train_domains[0]] == [s.path for s in task.train_domains[0]]
    assert [s.path for s in other.train_domains[0]] != [s.path for s in task.train_domains[0]]
    everything = _task(root, shots=None)
    assert len(everything.train_domains[0]) == 5 * (24 - HELD_OUT)


def test_the_shifted_sets_and_their_classes(root):
    sets = _task(root).eval_sets
    assert list(sets) == ["val", "imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    for name in ("imagenet", "imagenet_v2", "imagenet_sketch"):
        assert sets[name].classnames == SHAPES[:5] and {s.label for s in sets[name].samples} == set(range(5))
    for name in ("imagenet_a", "imagenet_r"):      # every other class, scored among its own
        assert sets[name].classnames == [SHAPES[i] for i in (0, 2, 4)]
        assert {s.label for s in sets[name].samples} == {0, 1, 2}
        assert all(f"n{[0, 2, 4][s.label]:08d}" in s.path for s in sets[name].samples)
    v2 = sets["imagenet_v2"].samples
    assert all(os.path.basename(os.path.dirname(s.path)) == str(s.label) for s in v2)


def test_a_missing_shifted_set_is_left_out_and_bad_folders_are_named(root, tmp_path):
    copy = tmp_path / "coop"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "imagenet-adversarial")
    assert "imagenet_a" not in _task(str(copy)).eval_sets
    (copy / "imagenet-sketch" / "images" / "n99999999").mkdir()
    with pytest.raises(DataError, match="class folders not in imagenet/classnames.txt: n99999999"):
        _task(str(copy))
    (copy / "imagenet" / "classnames.txt").write_text("n00000000\n")
    with pytest.raises(DataError, match="line 1: expected '<wnid> <class name>'"):
        _task(str(copy))
    with pytest.raises(DataError, match="classnames.txt does not exist"):
        _task(str(tmp_path / "nowhere"))


def test_train_and_sweep_produce_the_imagenet_shift_table(tmp_path, torch_path):
    from alignclip.sweep import sweep

    config = tmp_path / "imagenet.yaml"
    config.write_text(tiny_config(
        tmp_path / "data", tmp_path / "unused", "task=imagenet_shift", "data.shots=4",
        "data.synthetic={domains: 1, classes: 4, per_class: 12, image_size: 24}", "train.epochs=1",
        "train.iters_per_epoch=2", "train.attention_images=0").to_yaml())
    results = sweep(str(config), seeds=[0], baseline=True, output_dir=str(tmp_path / "sweep"), echo=lambda line: None)
    text = results["markdown"]
    assert "| ImageNet | -V2 | -S | -A | -R | OOD avg |" in text.replace("average ", "")
    rows = {(r["method"], r["tower"]): r["values"] for r in results["rows"]}
    assert set(rows) >= {("zero-shot", "zero_shot"), ("clipood", "bma"), ("alignclip", "bma"), ("alignclip", "best")}
    for values in rows.values():
        shifted = [values[m][0][0] for m in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")]
        assert values["ood"][0][0] == pytest.approx(sum(shifted) / 4)
    summary = json.loads((tmp_path / "sweep" / "alignclip" / "seed0" / "summary.json").read_text())
    assert summary["best"]["val"] is not None and "imagenet_r" in summary["best"]
