"""Typed configs: recipes, overrides and the one-line errors a user sees for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import cli
from kiln.config import Config, ConfigError, load

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))


def test_overrides_reach_nested_fields_with_types():
    cfg = load(Config, None, ["train.max_steps=7", "train.lr=1e-3", "model.preset=tiny", "train.tokens_per_step=1e4"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3 and cfg.model.preset == "tiny"
    assert cfg.train.tokens_per_step == 10000 and isinstance(cfg.train.tokens_per_step, int)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'\?"):
        load(Config, None, ["train.max_step=3"])


def test_key_under_wrong_section_is_pointed_to_the_right_one():
    with pytest.raises(ConfigError, match="did you mean .*'train.seed'"):
        load(Config, None, ["model.seed=3"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"config key 'train.max_steps' = 'many' is not int"):
        load(Config, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'train.schedule' = 'linear' is not 'cosine' \| 'wsd' \| 'constant'"):
        load(Config, None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match=r"'train.max_steps' = 2.5 is not int"):
        load(Config, None, ["train.max_steps=2.5"])


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(ConfigError, match="recipe file 'nope.yaml' does not exist"):
        load(Config, "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        load(Config, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load(Config, typo)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    load(Config, recipe)


def test_generate_takes_sample_keys_bare():
    cfg = load(Config, None, ["prompt=def f(", "top_k=5"], shorthand="sample")
    assert cfg.sample.prompt == "def f(" and cfg.sample.top_k == 5


def test_cli_prints_one_line_error_without_traceback(capsys):
    assert cli.main(["pretrain", "train.max_stepz=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "kiln pretrain: error: unknown config key 'train.max_stepz'; did you mean 'train.max_steps'?"


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.max_steps" in out and "1000" in out and "train.ckpt_every" in out and "resume" in out


def test_yaml_words_like_on_and_no_stay_strings(tmp_path):
    cfg = load(Config, None, ["train.compile=on", "sample.prompt=no", "train.activation_checkpointing=true"])
    assert cfg.train.compile == "on" and cfg.sample.prompt == "no" and cfg.train.activation_checkpointing is True
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  compile: off\n")
    assert load(Config, recipe).train.compile == "off"
