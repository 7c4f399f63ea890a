"""The training stages: `SFTRecipe` (stages/sft.py), the stages that extend it (DPO, align),
and `TwoStageRun` (stages/two_stage.py), which runs two of them in one run folder."""

from __future__ import annotations


def stage_class(cfg) -> type:
    """The recipe class a one-stage config selects (`stage=align`: stage 1; `dpo.enabled`:
    DPO; else SFT)."""
    if cfg.stage == "align":  # stage 1, the projector on captions (recipes *_align)
        from lmmtune.stages.align import AlignRecipe

        return AlignRecipe
    if cfg.dpo.enabled:  # the preference stage (recipes demo_dpo, medical_dpo)
        from lmmtune.stages.dpo import DPORecipe

        return DPORecipe
    from lmmtune.stages.sft import SFTRecipe

    return SFTRecipe


def train(cfg) -> dict:
    """Run the training the config names (two_stage.enabled: both stages); its metrics."""
    if cfg.two_stage.enabled:  # recipes demo_two_stage, medical_two_stage
        from lmmtune.stages.two_stage import TwoStageRun

        return TwoStageRun(cfg, stage_class).run()
    return stage_class(cfg)(cfg).run()
