"""Strict config loading: every shipped YAML validates; unknown keys, bad types and precedence."""
import glob
import os

import pytest
import yaml

from conftest import ROOT
from methods import method_config
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.config import Range
from utils.registry import UserError

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "options", "*", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "options")))
def test_every_shipped_config_validates(path):
    cfg = load_config(path, {}, method_config)
    folder = os.path.basename(os.path.dirname(path))
    # options/<method>/ holds that method's configs; options/{moco_v2,simsiam}/ hold contrastive_pretrain's in that mode
    assert folder in (cfg.method, getattr(cfg, "mode", None) if cfg.method == "contrastive_pretrain" else None), \
        "options/<method>/ holds that method's configs"


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"basic": {"method": "finetune_il", "dataset": "digits", "backbone": "resnet32", "lrate": 0.5},
        "options": {"digits": {"resnet32": {"lrate": 0.2, "epochs": 3},
                               "resnet18": {"lrate": 0.3, "epochs": 4}}},
        "special": {"lrate_decay": 0.5}}


def load(tmp_path, data, **cli):
    return load_config(write(tmp_path, data), cli, method_config)


def test_precedence_cli_over_special_over_options_over_basic(tmp_path):
    cfg = load(tmp_path, BASE)
    assert (cfg.lrate, cfg.epochs, cfg.lrate_decay) == (0.2, 3, 0.5)
    data = {**BASE, "special": {"lrate": 0.7}}
    assert load(tmp_path, data).lrate == 0.7
    assert load(tmp_path, data, lrate=0.9).lrate == 0.9


def test_options_block_is_chosen_after_cli_override_of_backbone(tmp_path):
    cfg = load(tmp_path, BASE, backbone="resnet18")
    assert (cfg.backbone, cfg.lrate, cfg.epochs) == ("resnet18", 0.3, 4)


def test_missing_options_block_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no block for dataset 'digits' and backbone 'resnet50'"):
        load(tmp_path, BASE, backbone="resnet50")


def test_unknown_key_names_file_key_and_closest(tmp_path):
    data = {**BASE, "basic": {**BASE["basic"], "lrat": 0.1}}
    with pytest.raises(UserError) as err:
        load(tmp_path, data)
    message = str(err.value)
    assert "c.yaml" in message and "'lrat'" in message and "did you mean 'lrate'" in message


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(UserError, match="'epochs' must be int"):
        load(tmp_path, BASE, epochs="ten")
    with pytest.raises(UserError, match="'shuffle' must be bool"):
        load(tmp_path, BASE, shuffle="maybe")


def test_missing_required_key(tmp_path):
    data = {"basic": {"method": "finetune_il", "dataset": "digits"}}
    with pytest.raises(UserError, match="missing required key 'backbone'"):
        load(tmp_path, data)


def test_dropped_original_key_says_why(tmp_path):
    data = {**BASE, "basic": {**BASE["basic"], "use_valid": True}}
    with pytest.raises(UserError, match="use_valid.*not supported"):
        load(tmp_path, data)


def test_choices_are_checked(tmp_path):
    with pytest.raises(UserError, match="opt_type"):
        load(tmp_path, BASE, opt_type="sgdd")


def test_cli_values_parse_booleans_lists_and_floats():
    cli = parse_cli_overrides(["--shuffle", "no", "--milestones", "30", "60", "--lrate", "1e-3", "--seed", "1"])
    assert cli == {"shuffle": False, "milestones": [30, 60], "lrate": "1e-3", "seed": 1}
    cfg = load_config(None, {**cli, "method": "finetune_il", "dataset": "digits", "backbone": "resnet32",
                             "apply_nme": "yes"}, method_config)
    assert cfg.shuffle is False and cfg.apply_nme is True
    assert cfg.milestones == [30, 60] and cfg.lrate == pytest.approx(1e-3) and cfg.seed == [1]


@pytest.mark.parametrize("text, message", [("", "empty"), ("basic: [1, 2", "malformed YAML"),
                                           ("bogus: {}", "unknown section")])
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(str(path), {}, method_config)


def test_config_is_read_only(tmp_path):
    cfg = load(tmp_path, BASE)
    with pytest.raises(AttributeError):
        cfg.lrate = 1.0


def test_declared_ranges_are_checked_where_the_value_comes_from(tmp_path):
    with pytest.raises(UserError, match=r"command line: key 'increment' must be at least 1 \(range \[1, inf\)\), got 0"):
        load(tmp_path, BASE, increment=0)
    with pytest.raises(UserError, match=r"command line: key 'memory_size' must not be negative \(range \[0, inf\)\), got -1"):
        load(tmp_path, BASE, memory_size=-1)
    data = {**BASE, "options": {"digits": {"resnet32": {"lrate": -0.2}}}}
    with pytest.raises(UserError, match=r"c.yaml \(options.digits.resnet32\): key 'lrate' must be positive \(range \(0, inf\)\)"):
        load(tmp_path, data)
    with pytest.raises(UserError, match="'milestones' must be at least 1"):
        load(tmp_path, BASE, milestones=[30, 0])
    assert load(tmp_path, BASE, opt_mom=0.0, seed=[0, 4294967295]).seed == [0, 4294967295]  # both ends are valid


@pytest.mark.parametrize("key,value,problem", [("note", "..", "not a folder name"), ("note", "/abs", "path separator"),
                                               ("seed", [1993, 1993], "given twice"), ("seed", [], "at least one")])
def test_cross_checks_name_where_the_value_was_given(key, value, problem, tmp_path):
    """The checks beyond a key's range name the command line for a value given there, the file for its own."""
    with pytest.raises(UserError, match=f"^command line: .*{problem}"):
        load(tmp_path, BASE, **{key: value})
    with pytest.raises(UserError, match=f"c.yaml \\(basic\\): .*{problem}"):
        load(tmp_path, {**BASE, "basic": {**BASE["basic"], key: value}})


def test_range_notation():
    r = Range.parse("[0, 1)")
    assert 0 in r and 0.5 in r and 1 not in r and -1e-9 not in r and float("nan") not in r
    assert str(r) == "[0, 1)" and str(Range.parse("(0, inf)")) == "(0, inf)" and r.describe() == "must lie in [0, 1)"
    assert float("inf") not in Range.parse("(0, inf)") and 10 ** 12 in Range.parse("[1, inf)")
    with pytest.raises(ValueError):
        Range.parse("0..1")


def test_duplicate_keys_merge_keys_and_encodings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("basic:\n  method: finetune_il\n  method: icarl\n")
    with pytest.raises(UserError, match="duplicate key 'method' at line 3"):
        load_config(str(path), {}, method_config)
    path.write_text("basic: {method: finetune_il, dataset: digits, backbone: resnet32}\n"
                    "options:\n  digits:\n    resnet32: &a {lrate: 0.3, epochs: 2}\n"
                    "    resnet18:\n      <<: *a\n      lrate: 0.4\n")
    assert load_config(str(path), {"backbone": "resnet18"}, method_config).lrate == 0.4  # a merge key may be overridden
    path.write_bytes(b"basic:\n  method: finetune_il  # \xff\n")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        load_config(str(path), {}, method_config)
    with pytest.raises(UserError, match="is a folder"):
        load_config(str(tmp_path), {}, method_config)


def test_cli_values_that_yaml_would_change_are_kept(tmp_path):
    assert parse_cli_overrides(["--note", ""]) == {"note": ""}
    assert parse_cli_overrides(["--note", "a\nb"]) == {"note": "a\nb"}
    for note in ("", "a\nb", "../x", "/abs", ".."):
        with pytest.raises(UserError, match="note"):
            load(tmp_path, BASE, note=note)
    assert load(tmp_path, BASE, note="lr0.1_run-2").note == "lr0.1_run-2"
    with pytest.raises(UserError, match="takes one value, got 2: 3 stray"):
        load(tmp_path, BASE, **parse_cli_overrides(["--epochs", "3", "stray"]))


def test_a_method_key_may_not_shadow_a_global_key_and_method_keys_are_a_frozen_object(tmp_path):
    import dataclasses

    from methods import register_method
    from utils.config import key

    @dataclasses.dataclass(frozen=True)
    class Shadowing:
        lrate: float = key(0.1, "a second learning rate", range="(0, inf)")

    with pytest.raises(TypeError, match="'lrate' shadows the global key"):
        register_method("shadowing", config=Shadowing)

    @dataclasses.dataclass
    class Mutable:
        strength: float = key(0.1, "a strength", range="(0, inf)")

    with pytest.raises(TypeError, match="frozen"):
        register_method("mutable", config=Mutable)
    cfg = load_config(os.path.join(ROOT, "options", "icarl", "digits.yaml"), {"T": 3}, method_config)
    assert isinstance(cfg.own, method_config("icarl")) and cfg.own.T == cfg.T == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.own.T = 1.0
