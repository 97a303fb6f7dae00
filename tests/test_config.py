"""Configuration: the authors' settings for every paper table resolve through `python -m alignclip
config`; types, ranges and templates are checked before any work."""
import math

import pytest
import yaml

from alignclip import cli
from alignclip.config import ConfigError, load_config

# (config, overrides) -> expected (lr, alpha, beta, epochs); the authors' main.py and scripts
PAPER = [
    ("pacs", [], (5e-6, 0.3, 0.5, 10)),
    ("vlcs", [], (5e-6, 0.3, 0.5, 10)),
    ("terra_incognita", [], (5e-6, 0.3, 0.5, 10)),
    ("office_home", [], (1e-5, 0.3, 0.5, 10)),
    ("domain_net", ["data.targets=[5]"], (1e-5, 0.1, 0.5, 20)),
    ("in_the_wild_office_home", ["data.targets=[2]"], (3e-6, 0.1, 0.1, 10)),
    ("in_the_wild_domain_net", ["data.targets=[1]"], (5e-6, 0.3, 0.5, 20)),
    ("in_the_wild_domain_net", ["data.targets=[3]"], (5e-6, 0.3, 0.5, 10)),
] + [("open_class", [f"data.dataset={name}"], (5e-6, 0.3, 0.1, epochs)) for name, epochs in [
    ("Caltech101", 1), ("DTD", 1), ("EuroSAT", 1), ("Food101", 1), ("Flowers102", 1), ("OxfordPets", 1),
    ("SUN397", 5), ("StanfordCars", 5), ("UCF101", 2), ("FGVCAircraft", 10), ("ImageNet", 10)]]


@pytest.mark.parametrize("name,overrides,want", PAPER, ids=[f"{n}{o}" for n, o, _ in PAPER])
def test_paper_settings_resolve_through_the_config_command(name, overrides, want, capsys):
    args = ["config", "--config", f"configs/{name}.yaml"] + [x for o in overrides for x in ("--set", o)]
    assert cli.main(args) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    got = (cfg["train"]["lr"], cfg["loss"]["alpha"], cfg["train"]["bma_beta"], cfg["train"]["epochs"])
    assert all(math.isclose(a, b) for a, b in zip(got, want)), (got, want)
    assert cfg["train"]["weight_decay"] == 0.1 and cfg["loss"]["aloss"] == 10.0
    assert cfg["loss"]["smoothing"] == 35.0 and cfg["loss"]["epsilon"] == 0.9
    assert cfg["loss"]["logit_scale"] is None                   # read from the model, as the authors
    assert cfg["data"]["batch_size"] == 36 and cfg["train"]["iters_per_epoch"] == 500


@pytest.mark.parametrize("override,match", [
    ("train.learning_rate=1e-4", "unknown config key train.learning_rate; allowed here: .*lr"),
    ("train.epochs=ten", "train.epochs must be an integer"),
    ("optimizer.lr=1", "unknown config key optimizer; allowed here: data, loss"),
    ("train.lr=0", "train.lr must be finite and > 0"),
    ("train.lr=.nan", "train.lr must be finite and > 0"),
    ("train.weight_decay=-1", "train.weight_decay must be finite and >= 0"),
    ("train.bma_beta=0", "train.bma_beta must be finite and > 0"),
    ("loss.epsilon=1.5", r"loss.epsilon must be in \[0, 1\]"),
    ("loss.alpha=-0.1", "loss.alpha must be finite and >= 0"),
    ("model.template='a photo'", "model.template must be a prompt with exactly one {}"),
    ("model.template='{} and {}'", "model.template must be a prompt with exactly one {}"),
    ("data.targets=[]", "data.targets must be a non-empty list"),
    ("data.holdout_fraction=1.0", r"data.holdout_fraction must be in \(0, 1\)"),
    ("task=zero_shot", "task must be one of domain_shift, open_class, in_the_wild"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_numbers_parse_as_numbers_and_cli_errors_are_one_line(tmp_path, capsys):
    assert load_config(overrides=["train.lr=3e-4"]).train.lr == 3e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch: 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key data.batch") and "\n" not in err
