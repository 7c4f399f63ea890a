"""Every recipe composes against the schema; bad settings fail with short, clear messages."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from lmmtune.config import Config, available_recipes
from lmmtune.errors import LmmtuneError
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli


@pytest.fixture()
def composer():
    return compose_config


def test_shipped_recipes_exist():
    assert {"demo", "medical"} <= set(available_recipes())


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes_into_the_schema(composer, recipe):
    cfg = composer([f"recipe={recipe}"])
    typed = OmegaConf.to_object(cfg)  # fails on any key or type the schema rejects
    assert isinstance(typed, Config)
    assert cfg.name == recipe


def test_recipe_overrides_win_over_base_config(composer):
    base, demo = composer(), composer(["recipe=demo"])
    assert base.train.learning_rate == 2e-4
    assert demo.train.learning_rate == 2e-3  # the recipe, not the base, decides
    assert demo.model.path == "tiny" and base.model.path == "llava-hf/llava-1.5-7b-hf"


def test_medical_recipe_follows_llava_lora_settings(composer):
    cfg = composer(["recipe=medical"])
    assert (cfg.peft.r, cfg.peft.alpha, cfg.train.learning_rate, cfg.peft.projector_lr) == (
        128,
        256,
        2e-4,
        2e-5,
    )
    assert cfg.quant.mode == "4bit" and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert cfg.train.scheduler == "cosine" and cfg.train.warmup_ratio == 0.03


def test_command_line_overrides_reach_the_config(composer):
    cfg = composer(["recipe=demo", "peft.r=4", "quant=none", "tracking=none"])
    assert cfg.peft.r == 4 and cfg.quant.mode == "none" and cfg.tracking.backend == "none"


def test_cli_prints_resolved_config(tmp_path):
    result = run_cli(["recipe=demo", "train.epochs=5", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.train.epochs == 5 and printed.name == "demo"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["recipe=medicl"], ["Could not find 'recipe/medicl'", "demo", "medical"]),
        (["recipe=demo", "train.learnig_rate=1"], ["Key 'learnig_rate' not in 'TrainConfig'"]),
        (["recipe=demo", "train.batch_size=big"], ["Value 'big'", "batch_size"]),
        (["notacommand"], ["unknown command 'notacommand'"]),
    ],
)
def test_bad_settings_fail_with_a_short_message(tmp_path, args, expected):
    result = run_cli([*args, "--cfg", "job"], cwd=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    # Hydra's message for an unknown recipe lists every recipe, one a line
    assert len(result.stderr.splitlines()) < 10 + len(available_recipes())


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.loss_impl=chunky", "expected one of [chunked, default"),
        ("quant.mode=16bit", "expected one of [4bit, 8bit, none]"),
        ("tracking.backend=wandb", "expected one of [mlflow, none]"),
        ("export.format=onnx", "expected one of [merged, adapter, gguf]"),
        ("model.dtype=float8", "expected one of [bfloat16, float16, float32]"),
        ("data.on_error=ignore", "expected one of [fail, skip]"),
        ("dpo.reference=copy", "expected one of [adapter_off, initial]"),
        ("dpo.loss_type=[sigmoid,sfft]", "Invalid value 'sfft', expected one of [sigmoid, hinge"),
    ],
)
def test_closed_sets_are_refused_at_composition(composer, override, expected):
    with pytest.raises(Exception, match=f"Error merging override {re.escape(override)}") as error:
        composer(["recipe=demo", override])
    assert expected in str(error.value.__cause__)


def test_closed_set_values_still_compare_as_strings(composer):
    cfg = composer(["recipe=demo", "quant=8bit"])
    assert cfg.quant.mode == "8bit" and f"{cfg.model.dtype}" == "float32"
    assert OmegaConf.to_yaml(cfg.quant).startswith("mode: 8bit")


def test_issue_command_with_four_bad_values_fails_before_doing_anything(tmp_path):
    args = ["check", "recipe=demo", "train.loss_impl=chunky", "quant.mode=16bit"]
    result = run_cli([*args, "tracking.backend=wandb", "export.format=onnx"], cwd=tmp_path)
    assert result.returncode != 0 and "Invalid value 'chunky'" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


BAD_VALUES = {
    "train.epochs": 0,
    "train.learning_rate": -1e-4,
    "train.batch_size": 0,
    "train.grad_accum": 0,
    "train.logging_steps": 0,
    "train.save_total_limit": -1,
    "peft.r": 0,
    "data.num_workers": -1,
    "data.eval_fraction": -0.5,
}


def test_validate_names_every_bad_value_in_one_line_each(composer):
    cfg = composer(["recipe=demo", *(f"{k}={v}" for k, v in BAD_VALUES.items())])
    with pytest.raises(LmmtuneError) as error:
        validate(cfg)
    lines = str(error.value).splitlines()[1:]
    assert sorted(line.split("=")[0].strip() for line in lines) == sorted(BAD_VALUES)


@pytest.mark.parametrize("fraction", [1.0, 1.5])
def test_eval_fraction_of_one_or_more_is_refused(composer, fraction):
    with pytest.raises(LmmtuneError, match=r"data.eval_fraction=.*within \[0, 1\)"):
        validate(composer(["recipe=demo", f"data.eval_fraction={fraction}"]))


def test_the_demo_and_the_schema_defaults_pass_validation(composer):
    validate(composer(["recipe=demo"]))
    validate(composer(["recipe=medical", "data.train=/data/train.json"]), "check")


def test_training_and_check_need_training_data(composer):
    with pytest.raises(LmmtuneError, match="data.train=null: set data.train=PATH"):
        validate(composer(["recipe=medical"]), "check")
    validate(composer(["recipe=medical"]), "eval")  # eval reads the run's data settings


def test_settings_that_need_each_other(composer):
    with pytest.raises(LmmtuneError, match="train.keep_best=true needs train.eval_steps"):
        validate(composer(["recipe=demo", "train.keep_best=true"]))
    validate(composer(["recipe=demo", "train.keep_best=true", "train.eval_steps=5"]))
    with pytest.raises(LmmtuneError, match="register_name needs export.format=merged"):
        validate(composer(["export.register_name=m", "export.format=adapter"]), "export")
    with pytest.raises(LmmtuneError, match="register_name needs tracking on"):
        validate(composer(["export.register_name=m", "tracking=none"]), "export")


def test_dpo_loss_weights_need_one_weight_per_loss(composer):
    cfg = composer(["recipe=demo_dpo", "dpo.from_base=true", "dpo.loss_weights=[1.0]"])
    with pytest.raises(LmmtuneError, match="dpo.loss_weights has 1 weight.s. for 2 dpo.loss_type"):
        validate(cfg)
    validate(composer(["recipe=demo_dpo", "dpo.from_base=true", "dpo.loss_weights=[1.0,0.5]"]))


def test_a_list_of_closed_set_values_logs_as_a_list_of_strings(composer):
    loss_type = composer(["recipe=demo_dpo"]).dpo.loss_type
    assert str(list(loss_type)) == "['sigmoid', 'sft']" and loss_type == ["sigmoid", "sft"]


def test_transformers_optimizer_and_scheduler_names_are_checked(composer):
    with pytest.raises(LmmtuneError, match="did you mean adamw_torch"):
        validate(composer(["recipe=demo", "train.optim=adamw_torh"]))
    with pytest.raises(LmmtuneError, match="train.scheduler=cosin: did you mean cosine"):
        validate(composer(["recipe=demo", "train.scheduler=cosin"]))


def test_unusable_output_dirs_are_refused(composer, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for output_dir, reason in (
        (a_file, "is a file"),
        (a_file / "run", "not writable"),
        (tmp_path / ("x" * 300), "longer than the file system allows"),
    ):
        with pytest.raises(LmmtuneError, match=reason):
            validate(composer(["recipe=demo", f"output_dir={output_dir}"]))


def test_an_unset_environment_variable_is_named(composer, monkeypatch):
    monkeypatch.delenv("LMMTUNE_TEST_UNSET", raising=False)
    cfg = composer(["recipe=demo", "tracking.tracking_uri=${oc.env:LMMTUNE_TEST_UNSET}"])
    with pytest.raises(LmmtuneError, match="tracking.tracking_uri: .*LMMTUNE_TEST_UNSET"):
        validate(cfg)


def test_a_failed_start_leaves_nothing_that_blocks_the_fixed_command(tmp_path):
    """keep_best without eval_steps once failed after the model load and left config.yaml."""
    result = run_cli(["recipe=demo", "train.keep_best=true", "output_dir=run"], cwd=tmp_path)
    assert result.returncode == 1
    assert "train.keep_best=true needs train.eval_steps" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


MY_RECIPE = """# @package _global_
defaults:
  - override /model: tiny
name: mine
train:
  epochs: 3
"""


def test_a_recipe_file_of_ones_own(composer, tmp_path):
    path = tmp_path / "my_recipe.yaml"
    path.write_text(MY_RECIPE)
    cfg = composer([f"recipe={path}"])
    assert (cfg.name, cfg.train.epochs, cfg.model.path) == ("mine", 3, "tiny")
    printed = run_cli([f"recipe={path}", "train.epochs=4", "--cfg", "job"], cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert OmegaConf.create(printed.stdout).train.epochs == 4


def test_a_recipes_folder_from_the_environment(composer, tmp_path, monkeypatch):
    (tmp_path / "ward7.yaml").write_text(MY_RECIPE)
    monkeypatch.setenv("LMMTUNE_RECIPES_PATH", str(tmp_path))
    assert "ward7" in available_recipes()
    assert composer(["recipe=ward7"]).name == "mine"
    missing = run_cli(["recipe=ward8", "--cfg", "job"], cwd=tmp_path)
    assert "ward7" in missing.stderr  # listed among the recipes to choose from


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_a_start_that_fails_late_removes_the_folder_it_made_and_nothing_else(tmp_path):
    """A bad model path is found after config.yaml is written: it once blocked the retry."""
    bad = ["recipe=demo", "model.path=/nonexistent/model", "tracking=none"]
    result = run_cli([*bad, "output_dir=run"], cwd=tmp_path)
    assert result.returncode == 1 and "'/nonexistent/model' is not a directory" in result.stderr
    assert not (tmp_path / "run").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    result = run_cli([*bad, "output_dir=mine"], cwd=tmp_path)
    assert result.returncode == 1 and (mine / "notes.txt").read_text() == "the user's"


def billion_laughs(levels: int = 9) -> str:
    """A recipe of about 500 bytes whose aliases expand to 9**levels values."""
    lines = ["# @package _global_", "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join([*lines, "name: laughs", ""])


HOSTILE_YAML = {
    "billion laughs": (
        billion_laughs(),
        r'line \d+: its aliases expand to more than 100,000 values \(a "billion laughs"\)',
    ),
    "python tag": (
        "# @package _global_\nname: !!python/object/apply:os.system ['touch pwned']\n",
        r"line 2: the YAML tag !!python/object/apply:os.system is refused",
    ),
    "own tag": (
        "# @package _global_\nname: !secret x\n",
        "line 2: the YAML tag !secret is refused",
    ),
    "alias in itself": (
        "# @package _global_\nname: x\nl: &s [1, *s]\n",
        "line 3: an alias refers to itself",
    ),
    "broken": ("# @package _global_\nname: [x\n", r"line 3: not valid YAML \(expected ',' or ']'"),
}


@pytest.mark.parametrize("case", HOSTILE_YAML)
def test_a_hostile_recipe_file_is_refused_in_one_line(case, tmp_path):
    text, reason = HOSTILE_YAML[case]
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(text)
    result = run_cli(["check", f"recipe={recipe}"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert re.search(f"^lmmtune check: error: recipe file {re.escape(str(recipe))}, {reason}", line)
    assert "Traceback" not in result.stderr and not (tmp_path / "pwned").exists()
    assert len(recipe.read_text()) < 600


def test_a_hostile_recipe_in_the_recipes_folder_is_named(tmp_path, monkeypatch):
    (tmp_path / "laughs.yaml").write_text(billion_laughs())
    result = run_cli(
        ["check", "recipe=demo"],
        cwd=tmp_path,
        env={"LMMTUNE_RECIPES_PATH": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 2 and "laughs.yaml, line 7: its aliases expand" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_config_that_bombs_is_refused_by_eval(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(billion_laughs().replace("# @package _global_\n", ""))
    (run / "adapter").mkdir()  # found before the run's settings are read
    (run / "adapter" / "adapter_config.json").write_text("{}")
    result = run_cli(["eval", "output_dir=run"], cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "run's config run/config.yaml, line 6: its aliases expand to more than" in result.stderr
