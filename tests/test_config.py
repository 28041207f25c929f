"""Typed configs: recipes, overrides and the one-line errors a user sees for bad keys and values."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from conftest import TINY_TRAIN, kiln
from kiln import cli
from kiln.config import Config, ConfigError, dump_yaml, load

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))


def test_overrides_reach_nested_fields_with_types():
    cfg = load(Config, None, ["train.max_steps=7", "train.lr=1e-3", "model.preset=tiny", "train.tokens_per_step=1e4"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3 and cfg.model.preset == "tiny"
    assert cfg.train.tokens_per_step == 10000 and isinstance(cfg.train.tokens_per_step, int)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'\?"):
        load(Config, None, ["train.max_step=3"])


def test_key_under_wrong_section_is_pointed_to_the_right_one():
    scope = ("out", "resume", "device", "data.path", "model", "train", "parallel")  # what pretrain uses
    with pytest.raises(ConfigError, match="did you mean 'train.seed'\\?"):
        load(Config, None, ["model.seed=3"], scope=scope)
    assert kiln("pretrain", "model.seed=3") == 2


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"config key 'train.max_steps' = 'many' is not int"):
        load(Config, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'train.schedule' = 'linear' is not 'cosine' \| 'wsd' \| 'constant'"):
        load(Config, None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match=r"'train.max_steps' = '2.5' is not int; write a whole number such as 1000, 64k"):
        load(Config, None, ["train.max_steps=2.5"])
    with pytest.raises(ConfigError, match=r"'train.tensorboard' = 'yes' is not bool; write true or false"):
        load(Config, None, ["train.tensorboard=yes"])


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


def test_help_says_what_each_option_means_from_its_comment(capsys):
    """`--help` shows the source's comment of each option: the one at the end of its line, after
    the comment lines just above it; an option with none shows none, and no section rule leaks in."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "  (" in line}
    assert rows["port"].endswith("(int)  0 = a free port (printed at start)")
    assert rows["out"].endswith("(str)")  # no comment in the source
    assert rows["max_body_bytes"].endswith("(int)  a larger request body is refused (413)")
    with pytest.raises(SystemExit):
        cli.main(["rl", "--help"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "  (" in line}
    # a comment block above the field, then nothing at its end
    assert rows["rl.heal"].endswith('(bool)  token healing of text-format prompts (kiln.infer.healing): a prompt '
                                    'ending in "\\n" may go on with "\\n    " as the tokenizer merged it in '
                                    "training; chat prompts are never healed")
    # a block of several comment lines above, joined
    assert "('code' | 'docstring')  the default task: \"code\" writes" in rows["rl.task"]
    assert not any("----" in line for line in rows.values())
    with pytest.raises(SystemExit):
        cli.main(["speedrun", "--help"])
    out = capsys.readouterr().out
    # a field written over several lines: the comment on its first line
    assert any(line.split()[0] == "speedrun.student" and line.endswith("(a list of str)  the student's model.* overrides")
               for line in out.splitlines() if line.startswith("  "))


def test_yaml_words_like_on_and_no_stay_strings(tmp_path):
    cfg = load(Config, None, ["train.compile=on", "sample.prompt=no", "train.activation_checkpointing=true"])
    assert cfg.train.compile == "on" and cfg.sample.prompt == "no" and cfg.train.activation_checkpointing is True
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  compile: off\n")
    assert load(Config, recipe).train.compile == "off"


# ---- ranges ------------------------------------------------------------------------------------
def _numeric_fields(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _numeric_fields(typ, f"{prefix}{f.name}.")
        elif {int, float} & set(typing.get_args(typ) or (typ,)) and typ is not bool:
            yield f"{prefix}{f.name}", f


def test_every_numeric_key_declares_its_range():
    fields = dict(_numeric_fields(Config))
    assert {"train.lr", "data.val_fraction", "model.d_model", "sample.top_p", "parallel.dp_shard"} <= set(fields)
    unranged = [k for k, f in fields.items() if not f.metadata.get("range")]
    assert not unranged, f"declare these keys' bounds with kiln.config.ranged(...): {unranged}"


@pytest.mark.parametrize(("override", "bound"), [
    ("train.batch_size=0", "≥ 1"), ("train.batch_size=-3", "≥ 1"), ("train.lr=-1", "> 0"), ("train.lr=0", "> 0"),
    ("train.max_steps=-5", "≥ 1"), ("data.val_fraction=1.5", "> 0 and < 1"), ("sample.temperature=-1", "≥ 0"),
    ("sample.top_p=0", "> 0 and ≤ 1"), ("sample.top_k=-1", "≥ 0"), ("train.warmup_steps=-1", "≥ 0"),
    ("train.min_lr_ratio=2", "≥ 0 and ≤ 1"), ("parallel.dp_shard=-2", "≥ -1"), ("parallel.timeout_s=0", "> 0"),
    ("model.n_layers=0", "≥ 1"), ("model.norm_eps=0", "> 0"), ("data.tokenizer.vocab_size=200", "≥ 264"),
])
def test_out_of_range_values_stop_at_load(override, bound):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' = .* is out of range: it must be {bound}$"):
        load(Config, None, [override])


def test_edges_of_the_ranges_are_allowed():
    cfg = load(Config, None, ["sample.temperature=0", "sample.top_p=1", "sample.top_k=0", "parallel.dp_shard=-1",
                              "train.warmup_steps=0", "train.max_steps=1", "model.n_kv_heads=0"])
    assert cfg.sample.temperature == 0 and cfg.sample.top_p == 1 and cfg.train.max_steps == 1


def test_unknown_preset_and_impossible_shapes_stop_at_load():
    with pytest.raises(ConfigError, match=r"'model.preset' = 'tiyn' is not 'tiny' \| .*; did you mean 'tiny'\?$"):
        load(Config, None, ["model.preset=tiyn"])
    with pytest.raises(ConfigError, match=r"model.d_model=100 is not divisible by model.n_heads=6"):
        load(Config, None, ["model.d_model=100"])
    cfg = load(Config, None, ["model.preset=tiny", "model.d_model=128", "model.n_layers=null"])
    assert cfg.model.d_model == 128 and cfg.model.n_layers is None
    assert cfg.model.build().n_layers == 2  # tiny's


# ---- values typed by the key ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ["def fibonacci(n):", "# comment", "true", "1e3", "", "null", "{a: 1}", "[1, 2]",
                                  "key=value", " leading space"])
def test_text_keys_keep_exactly_what_was_typed(text):
    assert load(Config, None, [f"sample.prompt={text}"]).sample.prompt == text
    assert load(Config, None, [f"prompt={text}"], shorthand="sample").sample.prompt == text


def test_numbers_take_si_suffixes_and_exponents():
    cfg = load(Config, None, ["data.shard_tokens=64k", "train.tokens_per_step=1.5M", "data.max_docs=2T",
                              "data.tokenizer.train_bytes=1_000_000", "data.reader.task_bytes=15e6", "train.lr=3e-4",
                              "data.max_chars=2G", "data.min_chars=1.5K"])
    assert cfg.data.shard_tokens == 64_000 and cfg.train.tokens_per_step == 1_500_000
    assert cfg.data.max_docs == 2_000_000_000_000 and cfg.data.tokenizer.train_bytes == 1_000_000
    assert cfg.data.reader.task_bytes == 15_000_000 and cfg.train.lr == 0.0003
    assert cfg.data.max_chars == 2_000_000_000 and cfg.data.min_chars == 1500
    assert load(Config, None, ["train.lr=0.5k"]).train.lr == 500.0
    for bad in ("1.5", "64x", "k", "1e3.5", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"is not int; write a whole number"):
            load(Config, None, [f"data.shard_tokens={bad}"])


def test_lists_from_the_command_line():
    def stages(text):
        return load(Config, None, [f"data.stages={text}"]).data.stages

    assert stages("clean") == ["clean"]
    assert stages("clean,length") == stages("clean, length") == stages("[clean, length]") == ["clean", "length"]
    assert stages("[clean, {length: {min_chars: 10}}]") == ["clean", {"length": {"min_chars": 10}}]
    assert stages("{length: {min_chars: 10}}") == [{"length": {"min_chars": 10}}]
    assert stages("") == []
    prompts = load(Config, None, ['sample.report_prompts=["def f(a, b):", "import os"]']).sample.report_prompts
    assert prompts == ["def f(a, b):", "import os"]
    with pytest.raises(ConfigError, match=r"'data.stages' = '\[clean, length' is not a list; "
                                          r"write data.stages=a,b or data.stages=\[a, b\]$"):
        stages("[clean, length")


def test_literal_choices_ignore_case_and_suggest_the_closest():
    assert load(Config, None, ["train.schedule=WSD"]).train.schedule == "wsd"
    with pytest.raises(ConfigError, match=r"did you mean 'cosine'\?$"):
        load(Config, None, ["train.schedule=cosin"])


def test_recipe_values_keep_yaml_types_and_get_the_same_coercions(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  shard_tokens: 64k\n  stages: clean\nsample:\n  prompt: 42\n  top_k: 5\n"
                      "train:\n  tensorboard: false\n")
    cfg = load(Config, recipe)
    assert cfg.data.shard_tokens == 64_000 and cfg.data.stages == ["clean"]
    assert cfg.sample.prompt == "42" and cfg.sample.top_k == 5 and cfg.train.tensorboard is False
    recipe.write_text("sample:\n  prompt: {def f: x}\n")
    with pytest.raises(ConfigError, match=r"'sample.prompt' = \{'def f': 'x'\} is not str; write it as quoted text"):
        load(Config, recipe)


def test_misspelt_section_names_the_whole_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian.max_steps'; did you mean 'train.max_steps'\?$"):
        load(Config, None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.vocab_size'; did you mean 'data.tokenizer.vocab_size'\?$"):
        load(Config, None, ["data.vocab_size=300"])


# ---- continuing a run --------------------------------------------------------------------------
def saved_run(tmp_path, *overrides: str) -> Path:
    """A run directory whose config.yaml was written the way training writes it, beside a checkpoint
    (a directory without one is not a run to continue)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "checkpoints" / "step_0000001" / "checkpoint.json").write_text("{}")
    (run / "config.yaml").write_text(dump_yaml(load(Config, None, [f"out={run}", *overrides])))
    return run


def test_continuing_a_run_reads_its_config_then_recipe_then_overrides(tmp_path):
    run = saved_run(tmp_path, "model.preset=tiny", "train.lr=0.01", "train.max_steps=50", "parallel.tp=2",
                    "device=cpu", "resume=elsewhere/step_0000010")
    cfg = load(Config, None, [f"out={run}"], continue_run=True)
    assert cfg.model.preset == "tiny" and cfg.train.lr == 0.01 and cfg.train.max_steps == 50
    # how the earlier launch started and was laid out is not the run's: this launch says its own
    assert cfg.parallel.tp == 1 and cfg.device == "auto" and cfg.resume == "auto" and cfg.out == str(run)
    recipe = tmp_path / "more.yaml"
    recipe.write_text("train:\n  max_steps: 80\n  lr: 0.02\n")
    cfg = load(Config, recipe, [f"out={run}", "train.lr=0.03"], continue_run=True)
    assert (cfg.model.preset, cfg.train.max_steps, cfg.train.lr) == ("tiny", 80, 0.03)


def test_a_run_is_not_continued_with_resume_never_or_for_other_verbs(tmp_path):
    run = saved_run(tmp_path, "model.preset=tiny")
    assert load(Config, None, [f"out={run}", "resume=never"], continue_run=True).model.preset == "small"
    assert load(Config, None, [f"out={run}"]).model.preset == "small"


def test_a_damaged_saved_config_is_named(tmp_path):
    run = saved_run(tmp_path)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_steps:", "max_stepz:"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(run / 'config.yaml'))} \(the settings of the run being "
                                          r"continued\) does not load: unknown config key 'train.max_stepz'"):
        load(Config, None, [f"out={run}"], continue_run=True)


def test_pretrain_continues_a_run_given_only_its_out(run_dir, capsys):
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 0
    capsys.readouterr()
    assert kiln("pretrain", f"out={run_dir}", "train.max_steps=3") == 0  # the default model would be refused
    out = capsys.readouterr().out
    assert f"settings read from {run_dir / 'config.yaml'}" in out and "resumed from" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
