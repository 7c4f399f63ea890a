"""`TwoStageRun`: both stages of LLaVA training in one command (recipe=*_two_stage).

    run(): open OUT and its parent MLflow run -> stage 1 (align) -> stage 2 (instruct)

OUT (output_dir) holds stage 1's run folder (OUT/align), stage 2's (OUT/instruct), the
whole config and the parent MLflow run (`lmmtune.rundir.two_stage`). Each stage is the
recipe class its config selects (`stage_class`), run as any run is; its MLflow run is a
child of the parent, tagged with its stage (stage 2's also with stage 1's run id).

Refused at start, before stage 1 trains: both stages' settings (at composition), OUT's
state, and stage 2's data (the check its own start runs, read once more then). Resumable
across the stage boundary with train.resume=auto: a stage 1 that wrote its metrics.json
(a finished run) is not redone, and the stage it stopped in continues from its checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from lmmtune.commands import memory_plan
from lmmtune.data.checks import load_splits
from lmmtune.distributed import is_main
from lmmtune.errors import LmmtuneError, RunInterrupted
from lmmtune.model import load_processor
from lmmtune.rundir.resume import check_resume
from lmmtune.rundir.run import RunDir, command_inputs, job_output_dir, save_config
from lmmtune.rundir.two_stage import stage_dirs, two_stage_folder
from lmmtune.stage_configs import ALIGN, INSTRUCT, StageConfigs, stage_configs
from lmmtune.tracking.parent import children_of, parent_run_in
from lmmtune.tracking.sweep import sweep_job
from lmmtune.tracking.tracker import LocalRecord

log = logging.getLogger(__name__)

STAGE_TAG = "lmmtune.stage"
"""Tag of each stage's MLflow run: `align` or `instruct`."""
STAGE1_RUN_TAG = "lmmtune.stage1_run_id"
"""Tag of stage 2's MLflow run: the run of the stage 1 it started from."""


class TwoStageRun:
    """Stage 1 then stage 2 in one run folder; `run()` returns both stages' metrics.

    `stage_class(cfg)` is the recipe class a one-stage config selects (`lmmtune.stages`)."""

    def __init__(self, cfg: DictConfig, stage_class: Callable[[DictConfig], type]):
        self.cfg = cfg
        self.stage_class = stage_class

    def run(self) -> dict:
        cfg = self.cfg
        out = Path(job_output_dir(str(cfg.output_dir)))
        cfg.output_dir = str(out)
        stages = stage_configs(cfg, str(out))
        align_dir, _ = stage_dirs(out)
        inputs = command_inputs(stages.align) + command_inputs(stages.instruct)
        with two_stage_folder(out, cfg.overwrite, cfg.train.resume, inputs) as folder:
            if is_main():
                save_config(cfg, out)
            align_done = align_dir.holds_run() and align_dir.finished()
            if align_done:
                check_resume(stages.align, align_dir.config, align_dir.data_digest)
            else:
                check_instruct_data(stages.instruct)
            with self.parent_run(folder) as parent_run_id:
                return self.run_stages(stages, out, parent_run_id, align_done)

    def parent_run(self, folder: RunDir):
        """The parent MLflow run (reopened on a resume); a sweep job's: under the sweep's."""
        cfg, job = self.cfg, sweep_job()
        run_name = cfg.tracking.run_name or (job.run_name if job else folder.root.name)
        tags = {
            "recipe": cfg.name,
            "lmmtune.two_stage_dir": str(folder.root.resolve()),
            "mlflow.note.content": two_stage_description(cfg.name),
        }
        parent = job.parent_run_id if job else None
        return parent_run_in(folder.root, cfg.tracking, cfg.name, run_name, tags, parent)

    def run_stages(
        self, stages: StageConfigs, out: Path, parent_run_id: str | None, align_done: bool
    ) -> dict:
        align_dir, _ = stage_dirs(out)
        if align_done:
            log.info("stage 1 (%s) finished in %s: not redone", ALIGN, align_dir.root)
            align_metrics = json.loads(align_dir.metrics.read_text())
        else:
            log.info("stage 1 of 2 (%s) in %s", ALIGN, align_dir.root)
            with children_of(parent_run_id, {STAGE_TAG: ALIGN}):
                align_metrics = self.run_stage(stages.align, out)
            free_memory()
        instruct = instruct_config(stages.instruct, align_dir.root)
        stage1_run = LocalRecord(align_dir.root).state().get("run_id")
        tags = {STAGE_TAG: INSTRUCT, **({STAGE1_RUN_TAG: stage1_run} if stage1_run else {})}
        log.info("stage 2 of 2 (%s) in %s", INSTRUCT, instruct.output_dir)
        try:
            with children_of(parent_run_id, tags):
                instruct_metrics = self.run_stage(instruct, out)
        except RunInterrupted:  # its message says how to resume
            raise
        except LmmtuneError:
            log.warning(
                "stage 1 (%s) is finished and kept in %s; once stage 2 is fixed, the same "
                "command plus train.resume=auto goes on from stage 2",
                ALIGN,
                align_dir.root,
            )
            raise
        return {ALIGN: align_metrics, INSTRUCT: instruct_metrics}

    def run_stage(self, stage_cfg: DictConfig, out: Path) -> dict:
        """One stage, the recipe class its config selects; a signal's message names OUT."""
        stage = self.stage_class(stage_cfg)(stage_cfg)
        stage.resume_dir = out  # train.resume=auto continues the two-stage run, not one stage
        return stage.run()


def instruct_config(instruct: DictConfig, align_dir: Path) -> DictConfig:
    """Stage 2's config, starting from stage 1's projector (`model.projector=OUT/align`)."""
    instruct.model.projector = str(align_dir.resolve())  # the one place it is set
    return instruct


def check_instruct_data(instruct: DictConfig) -> None:
    """Stage 2's data as its start will check it (invalid records, an empty training set,
    the memory plan), before stage 1 trains: a run either refuses at start or finishes."""
    if not is_main():
        return
    log.info("checking stage 2's data (%s) before stage 1 starts", instruct.data.train)
    processor = load_processor(instruct.model)
    with tempfile.TemporaryDirectory(prefix="lmmtune-two-stage-") as work_dir:
        splits = load_splits(instruct.data, Path(work_dir), processor)
    if instruct.train.gpu_memory_gb is not None:
        log.info("stage 2: %s", memory_plan(instruct, splits.report))


def free_memory() -> None:
    """Stage 1's model and optimizer state go before stage 2's model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def two_stage_description(name: str) -> str:
    """The parent run's description (markdown)."""
    return (
        f"**Two-stage run** of recipe `{name}`: stage 1 (`{ALIGN}`) aligns the projector on "
        f"captions, stage 2 (`{INSTRUCT}`) instruction-tunes from it. Each stage is a child "
        "run below (expand this row); stage 2's run names stage 1's in the tag "
        f"`{STAGE1_RUN_TAG}`."
    )
