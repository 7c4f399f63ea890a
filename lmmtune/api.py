"""What a notebook needs: compose a config as the command line does, then run a command on it.

    import lmmtune
    cfg = lmmtune.compose_config(["recipe=demo", "output_dir=runs/demo"])
    metrics = lmmtune.finetune(cfg)
    lmmtune.evaluate(cfg)
    lmmtune.export_model(cfg)

Each function validates the config first, as `python -m lmmtune COMMAND` does. (The
names differ from the commands' (`train`, `export`, `check`, `predict`) so that no
notebook function reads like a module of the package.)
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python -m lmmtune OVERRIDES` gets (`recipe=NAME` or `recipe=PATH.yaml` included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmmtune.config import CONF_DIR, recipe_files_to_names, register_configs

    register_configs()
    overrides = recipe_files_to_names(list(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides)
    GlobalHydra.instance().clear()
    return cfg


def _run(command: str, cfg: DictConfig):
    from lmmtune.cli import COMMANDS
    from lmmtune.validate import validate

    validate(cfg, command)
    return COMMANDS[command].function()(cfg)


def finetune(cfg: DictConfig) -> dict:
    """Fine-tune as configured; the metrics also written to OUTPUT_DIR/metrics.json (a
    two-stage config: each stage's, by stage name, in OUTPUT_DIR/STAGE/metrics.json)."""
    return _run("train", cfg)


def check_data(cfg: DictConfig):
    """Check the data (and the memory plan); the data report (a two-stage config: each
    stage's, by stage name)."""
    return _run("check", cfg)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the run's base model and adapter again (`eval.*`); the metrics."""
    return _run("eval", cfg)


def export_model(cfg: DictConfig) -> dict:
    """Export the run's adapter (`export.*`); the export report."""
    return _run("export", cfg)


def predict_answers(cfg: DictConfig) -> list[dict]:
    """Answer `predict.question` or the questions of `predict.input`; the answers."""
    return _run("predict", cfg)


def merge_adapters(cfg: DictConfig) -> dict:
    """`python -m lmmtune merge`: combine `cfg.adapters` into one adapter in cfg.output_dir;
    the merge record."""
    return _run("merge", cfg)
