"""The training stages: `SFTRecipe` (stages/sft.py) and the stages that extend it (DPO, align)."""

from __future__ import annotations


def train(cfg) -> dict:
    """Run the training stage the config names (`stage=align`: stage 1; `dpo.enabled`: DPO;
    else SFT); its metrics."""
    if cfg.stage == "align":  # stage 1, the projector on captions (recipes *_align)
        from lmmtune.stages.align import AlignRecipe as Stage
    elif cfg.dpo.enabled:  # the preference stage (recipes demo_dpo, medical_dpo)
        from lmmtune.stages.dpo import DPORecipe as Stage
    else:
        from lmmtune.stages.sft import SFTRecipe as Stage
    return Stage(cfg).run()
