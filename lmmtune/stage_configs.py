"""The configs of the two stages of a two-stage run, derived from its one config.

A two-stage config (`two_stage.enabled`, recipe=*_two_stage) is stage 2's config, with
stage 1's differences in `two_stage.align`:

- stage 1 (`align`): the config with data.train = data.captions, data.eval and
  data.image_root unset (they are stage 2's data), then `two_stage.align` merged on top;
  it runs in OUTPUT_DIR/align;
- stage 2 (`instruct`): the config as it is; it runs in OUTPUT_DIR/instruct.

Both are plain one-stage configs, so whatever validates, checks or trains a stage does so
for either. Validation (`lmmtune.validate`), `check` and the runner
(`lmmtune.stages.two_stage`) all derive them here."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmmtune.errors import LmmtuneError

ALIGN = "align"
"""Stage 1, the projector's alignment on captions: its name and its folder in the run."""
INSTRUCT = "instruct"
"""Stage 2, instruction tuning: its name and its folder in the run."""

RUN_WIDE = {
    "name": "the MLflow experiment of the whole run: set it at the top level",
    "tracking": "one tracking for the whole run: set it at the top level",
    "output_dir": "stage 1 runs in OUTPUT_DIR/align: set output_dir for the whole run",
    "overwrite": "the whole run's: set it at the top level",
    "train.resume": "the whole run's: train.resume=auto continues the stage it stopped in",
    "two_stage": "stage 1 is one training stage",
    "dpo": "stage 1 aligns the projector; DPO runs after a finished run",
    "model.path": "stage 2 starts from stage 1's projector: both stages share the base model",
    "model.revision": "both stages share the base model",
    "data.train": "stage 1's data is data.captions",
    "data.captions": "stage 1's data is data.captions, set at the top level",
}
"""Settings `two_stage.align` may not set, and why: they belong to the whole run."""


@dataclass
class StageConfigs:
    align: DictConfig
    instruct: DictConfig


def align_problems(cfg: DictConfig) -> list[str]:
    """One line per setting of `two_stage.align` that the whole run owns (RUN_WIDE)."""
    settings = OmegaConf.to_container(cfg.two_stage.align, resolve=False)
    return [
        f"two_stage.align.{key}: not a stage-1 setting ({reason})"
        for key, reason in RUN_WIDE.items()
        if _holds(settings, key)
    ]


def _holds(tree: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def stage_configs(cfg: DictConfig, out: str | None = None) -> StageConfigs:
    """Stage 1's and stage 2's configs, in OUT/align and OUT/instruct (OUT: output_dir, or
    `out`, the run folder the runner resolved). LmmtuneError, one line per setting, when
    `two_stage.align` sets what the whole run owns or what the schema does not know."""
    problems = align_problems(cfg)
    if problems:
        raise LmmtuneError("\n  ".join(problems))
    out = out if out is not None else str(cfg.output_dir)
    align = _one_stage(cfg, out, ALIGN)
    align.data.train, align.data.eval, align.data.image_root = cfg.data.captions, None, None
    try:
        align = OmegaConf.merge(align, cfg.two_stage.align)
    except OmegaConfBaseException as exc:
        key = f"two_stage.align.{exc.full_key}" if exc.full_key else "two_stage.align"
        raise LmmtuneError(f"{key}: {_first_line(exc)}") from None
    return StageConfigs(align=align, instruct=_one_stage(cfg, out, INSTRUCT))


def _one_stage(cfg: DictConfig, out: str, name: str) -> DictConfig:
    """A copy of `cfg` as a one-stage config running in OUT/NAME, its MLflow run named
    after its stage (after tracking.run_name too, if set)."""
    stage = copy.deepcopy(cfg)
    stage.output_dir = f"{out}/{name}"
    run_name = cfg.tracking.run_name
    stage.tracking.run_name = f"{run_name} {name}" if run_name else name
    stage.data.captions = None
    stage.two_stage.enabled = False
    stage.two_stage.align = {}
    return stage


def _first_line(exc: OmegaConfBaseException) -> str:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return message.removeprefix("Key ").replace(" not in ", " is not a setting of ")


def each_stage(stages: StageConfigs) -> Iterator[tuple[str, str, DictConfig]]:
    """(name, title, config) of each stage, in the order they run."""
    yield ALIGN, f"stage 1 ({ALIGN})", stages.align
    yield INSTRUCT, f"stage 2 ({INSTRUCT})", stages.instruct
