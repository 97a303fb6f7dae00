"""Data: folder layout and validation, DomainBed's own splits (membership compared with its
algorithm), in-the-wild and open-class tasks, prompts, step-indexed batches."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from alignclip.config import DataConfig
from alignclip.data import DataError, StepBatches, build_task, coop, write_synthetic
from alignclip.data.domainbed import domainbed_seed_hash, holdout_split, load_domains
from alignclip.data.samples import list_images


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic(str(root), domains=3, classes=4, per_class=10, size=16)
    return str(root)


def _data(root, **kw):
    return DataConfig(root=root, dataset="Synthetic", targets=[2], **kw)


def _domainbed_split(n_items, n_out, seed):
    """DomainBed's misc.split_dataset and misc.seed_hash, as they are written there."""
    keys = list(range(n_items))
    np.random.RandomState(seed).shuffle(keys)
    return keys[:n_out], keys[n_out:]


def test_seed_hash_is_domainbeds():
    assert domainbed_seed_hash(0, 1) == int(hashlib.md5(str((0, 1)).encode()).hexdigest(), 16) % 2 ** 31
    assert domainbed_seed_hash(0, 2, "base") != domainbed_seed_hash(0, 2, "open")


def test_holdout_membership_equals_domainbeds(synthetic):
    _, _, samples = load_domains(synthetic, "Synthetic")
    for i, items in enumerate(samples.values()):
        train, hold = holdout_split(items, 0, i, fraction=0.2)
        out_keys, in_keys = _domainbed_split(len(items), int(len(items) * 0.2),
                                             int(hashlib.md5(str((0, i)).encode()).hexdigest(), 16) % 2 ** 31)
        assert hold == [items[k] for k in out_keys] and train == [items[k] for k in in_keys]


def test_domains_and_classes_are_sorted_like_imagefolder_without_hidden_folders(synthetic, tmp_path):
    domains, classes, samples = load_domains(synthetic, "Synthetic")
    assert domains == sorted(domains) and classes == sorted(classes) and len(classes) == 4
    for d in domains:
        labels = [s.label for s in samples[d]]
        assert len(labels) == 40 and labels == sorted(labels)
    folder = tmp_path / "cls"
    (folder / "sub").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    for path in (folder / "b.PNG", folder / "a.jpg", folder / "sub" / "c.jpg",
                 folder / ".ipynb_checkpoints" / "d.jpg", folder / "notes.txt"):
        path.write_bytes(b"x")
    assert [os.path.relpath(p, folder) for p in list_images(str(folder))] == ["a.jpg", "b.PNG", "sub/c.jpg"]


def test_hidden_folders_are_not_classes_and_an_empty_class_is_an_error(tmp_path):
    write_synthetic(str(tmp_path), domains=2, classes=2, per_class=2, size=8)
    base = tmp_path / "Synthetic"
    for domain in (d for d in base.iterdir() if d.is_dir()):
        (domain / ".ipynb_checkpoints").mkdir()
    _, classes, _ = load_domains(str(tmp_path), "Synthetic")
    assert ".ipynb_checkpoints" not in classes
    for domain in (d for d in base.iterdir() if d.is_dir()):
        (domain / "zebra").mkdir()
    with pytest.raises(DataError, match="class folder.s. zebra hold no images in any domain"):
        load_domains(str(tmp_path), "Synthetic")


def test_domain_shift_task_tests_on_the_targets_holdout(synthetic):
    task = build_task(_data(synthetic), "domain_shift", seed=0)
    assert len(task.train_domains) == 2 and len(task.classnames) == 4
    assert len(task.eval_sets["val"].samples) == 16 and len(task.eval_sets["test"].samples) == 8
    assert task.template == "a photo of a {}."


def test_in_the_wild_base_is_floor_half_and_tests_on_the_whole_target(synthetic):
    task = build_task(_data(synthetic), "in_the_wild", seed=0)
    assert task.classnames == sorted(task.classnames)[:2]             # floor(4 / 2) base classes
    assert all(s.label < 2 for d in task.train_domains for s in d)
    test, open_ = task.eval_sets["test"], task.eval_sets["open"]
    assert len(test.samples) + len(open_.samples) == 40               # the whole target domain
    assert all(s.label < 2 for s in test.samples) and all(s.label >= 2 for s in open_.samples)
    assert len(test.classnames) == len(open_.classnames) == 4          # against all class names
    _, _, samples = load_domains(synthetic, "Synthetic")
    source = sorted(samples)[0]
    base = [s for s in samples[source] if s.label < 2]
    want_val = holdout_split(base, 0, 0, "base")[1]
    assert set(want_val) <= set(task.eval_sets["val"].samples)


def _coop_folder(tmp_path, names, per_class=3):
    folder = tmp_path / "dtd" / "images"
    entries = []
    for label, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8)).save(folder / name / f"{i}.jpg")
            entries.append([f"{name}/{i}.jpg", label, name])
    split = {"train": entries, "val": entries[::3], "test": entries}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))


def test_open_class_task_from_coop_split_file_with_coops_prompt(tmp_path):
    names = ["banded", "dotted", "zigzag", "woven", "veined"]
    _coop_folder(tmp_path, names)
    task = build_task(DataConfig(root=str(tmp_path), dataset="DTD", shots=2), "open_class", seed=0)
    assert task.classnames == names[:3]                   # ceil(5 / 2) base classes
    assert len(task.train_domains[0]) == 6                # 2 shots x 3 base classes
    assert task.eval_sets["open"].classnames == names[3:]
    assert sorted({s.label for s in task.eval_sets["open"].samples}) == [0, 1]
    assert task.template == "{} texture."


def test_coop_prompts_are_the_papers():
    assert coop.template("OxfordPets") == "a photo of a {}, a type of pet."
    assert coop.template("EuroSAT") == "a centered satellite photo of {}."
    assert coop.template("UCF101") == "a photo of a person doing {}."
    assert coop.template("Caltech101") == "a photo of a {}."


def test_step_batches_are_a_function_of_the_step_and_ranks_partition_them():
    full = StepBatches(10, 4, seed=0, domain=1, start=0, stop=7)
    batches = list(full)
    assert list(StepBatches(10, 4, 0, 1, 5, 7)) == batches[5:]
    seen = [i for b in batches[:5] for i, _ in b]
    assert sorted(seen[:10]) == list(range(10))
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
