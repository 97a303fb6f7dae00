"""Data: folder layout and validation, seeded splits, open-class splits, step-indexed batches."""
import json
import os

import pytest
from PIL import Image

from alignclip.data import DataError, StepBatches, build_task, write_synthetic
from alignclip.data.domainbed import holdout_split, load_domains

DATA = {"dataset": "Synthetic", "targets": [2], "holdout_fraction": 0.2, "shots": None,
        "split_file": None}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic(str(root), domains=3, classes=4, per_class=10, size=16)
    return str(root)


def test_domains_and_classes_are_sorted_like_imagefolder(synthetic):
    domains, classes, samples = load_domains(synthetic, "Synthetic")
    assert domains == sorted(domains) and classes == sorted(classes) and len(classes) == 4
    for d in domains:
        assert len(samples[d]) == 40
        labels = [s.label for s in samples[d]]
        assert labels == sorted(labels)
        assert all(os.path.basename(os.path.dirname(s.path)) == classes[s.label] for s in samples[d])


def test_holdout_split_is_seeded_80_20(synthetic):
    _, _, samples = load_domains(synthetic, "Synthetic")
    items = next(iter(samples.values()))
    train, hold = holdout_split(items, seed=0, domain_index=1)
    assert len(hold) == 8 and len(train) == 32 and not set(train) & set(hold)
    assert holdout_split(items, 0, 1) == (train, hold)
    assert holdout_split(items, 1, 1)[1] != hold


def test_domain_shift_task(synthetic):
    task = build_task(dict(DATA, root=synthetic), "domain_shift", seed=0)
    assert len(task.train_domains) == 2 and len(task.classnames) == 4
    assert len(task.eval_sets["val"].samples) == 16 and len(task.eval_sets["test"].samples) == 8
    base = os.path.join(synthetic, "Synthetic")
    target_dir = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))[2]
    assert all(f"/{target_dir}/" in s.path for s in task.eval_sets["test"].samples)


def test_in_the_wild_task_splits_base_and_open_classes(synthetic):
    task = build_task(dict(DATA, root=synthetic), "in_the_wild", seed=0)
    assert len(task.classnames) == 2
    assert all(s.label < 2 for d in task.train_domains for s in d)
    assert all(s.label < 2 for s in task.eval_sets["test"].samples)
    assert all(s.label >= 2 for s in task.eval_sets["open"].samples)
    assert len(task.eval_sets["open"].classnames) == 4


def test_open_class_task_from_coop_split_file(tmp_path):
    folder = tmp_path / "dtd" / "images"
    names = ["banded", "dotted", "zigzag", "woven", "veined"]
    entries = []
    for label, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(folder / name / f"{i}.jpg")
            entries.append([f"{name}/{i}.jpg", label, name])
    split = {"train": entries, "val": entries[::3], "test": entries}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    cfg = dict(DATA, root=str(tmp_path), dataset="DTD", shots=2)
    task = build_task(cfg, "open_class", seed=0)
    assert task.classnames == names[:3]
    assert len(task.train_domains[0]) == 6       # 2 shots x 3 base classes
    assert task.eval_sets["open"].classnames == names[3:]
    assert sorted({s.label for s in task.eval_sets["open"].samples}) == [0, 1]


def test_step_batches_are_a_function_of_the_step_and_ranks_partition_them():
    full = StepBatches(10, 4, seed=0, domain=1, start=0, stop=7)
    batches = list(full)
    assert list(StepBatches(10, 4, 0, 1, 5, 7)) == batches[5:]
    seen = [i for b in batches[:5] for i, _ in b]
    assert sorted(seen[:10]) == list(range(10))          # each pass visits every image once
    ranks = [list(StepBatches(10, 4, 0, 1, 0, 7, rank=r, world=2)) for r in range(2)]
    for step in range(7):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batches[step])


def test_bad_folders_are_refused_with_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_domains(str(tmp_path), "PACS")
    write_synthetic(str(tmp_path), domains=2, classes=2, per_class=2, size=8)
    base = tmp_path / "Synthetic"
    domains = sorted(d.name for d in base.iterdir() if d.is_dir())
    victim = base / domains[1] / sorted(os.listdir(base / domains[1]))[0]
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    with pytest.raises(DataError, match=f"{domains[1]} lacks class folder"):
        load_domains(str(tmp_path), "Synthetic")
    with pytest.raises(DataError, match="data.dataset must be one of"):
        load_domains(str(tmp_path), "Imagenette")


def test_empty_domain_is_refused_with_its_path(tmp_path):
    write_synthetic(str(tmp_path), domains=2, classes=2, per_class=2, size=8)
    base = tmp_path / "Synthetic"
    domain = sorted(d for d in base.iterdir() if d.is_dir())[0]
    for f in domain.rglob("*.png"):
        f.unlink()
    with pytest.raises(DataError, match=f"{domain} holds no images"):
        load_domains(str(tmp_path), "Synthetic")
