"""Every recipe composes against the schema; bad settings fail with short, clear messages."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmmtune.config import Config, available_recipes

from .conftest import compose_config, run_cli


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
    assert len(result.stderr.splitlines()) < 15
