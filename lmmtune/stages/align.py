"""`AlignRecipe`: LLaVA's stage 1, the SFT recipe with its own model, evaluation and result.

The projector alone trains (fp32), on images and their captions in LLaVA's `plain` template
(`data.template=plain`); the language model stays frozen in 4-bit, 8-bit or unquantized
(`quant.mode`), the vision tower frozen, no LoRA. What it measures is the caption loss on
the held-out captions, before and after training (no generated answers: a stage-1 model
is not asked questions). What it keeps is the projector: `RUN/projector/` holds
`projector.safetensors` (llava-hf keys, fp32) and a card; `model.projector=RUN` starts
instruction tuning from it. Data, checks, run folder, resume, `train.keep_best` and MLflow
tracking are the SFT recipe's own.
"""

from __future__ import annotations

import json
import logging
import shutil

import torch

from lmmtune.data.batches import SupervisedDataset
from lmmtune.distributed import is_main, on_main
from lmmtune.errors import LmmtuneError
from lmmtune.rundir.files import write_text_atomic
from lmmtune.rundir.run import PROJECTOR_FILE
from lmmtune.stages.checks import SCRATCH, after_training, check_space_for_checkpoints, folder_bytes
from lmmtune.stages.sft import SFTRecipe
from lmmtune.training.projector import (
    PROJECTOR_WEIGHTS,
    ProjectorTraining,
    read_projector_keys,
    save_projector,
)

log = logging.getLogger(__name__)

EVAL_LOSS = "eval_loss"


class AlignRecipe(SFTRecipe):
    """Stage 1: align the projector to the language model on captions."""

    def run_tags(self) -> dict[str, str]:
        return {**super().run_tags(), "stage": "align"}

    def build_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """The base with its projector alone trainable (no LoRA, no generation metrics)."""
        self.evaluates, self.before = False, None
        return ProjectorTraining(base)

    def build_trainer(self):
        """SFT's Trainer, which also measures the held-out caption loss before the first step."""
        trainer = super().build_trainer()
        if self.splits.eval:
            trainer.eval_dataset = trainer.eval_dataset or self.caption_set(self.splits.eval)
            trainer.args.eval_on_start = self.resume_from is None  # a resume keeps its history
        return trainer

    def caption_set(self, samples) -> SupervisedDataset:
        data_cfg = self.data_cfg
        return SupervisedDataset(
            samples, self.processor, data_cfg.max_length, data_cfg.max_image_pixels,
            data_cfg.template, data_cfg.pad_to_square,
        )  # fmt: skip

    def check_can_finish(self) -> None:
        """A dry run of writing the projector, then the disk space for checkpoints."""
        samples = len(self.lengths)
        on_main(check_projector_saving, self.model, self.train_cfg, samples, self.folder.root)

    def record_training(self, result) -> None:
        """SFT's numbers, and the held-out caption loss before and after (every rank takes
        part in the evaluation)."""
        super().record_training(result)
        if not self.splits.eval:
            return
        history = self.trainer.state.log_history
        before = next(
            (e[EVAL_LOSS] for e in history if e.get("step") == 0 and EVAL_LOSS in e), None
        )
        after = self.trainer.evaluate()[EVAL_LOSS]
        self.metrics["caption_loss"] = {"before": before, "after": after}
        log.info("held-out caption loss: %s -> %.4f", before and f"{before:.4f}", after)
        losses = {"before": before, "after": after}
        self.tracker.set_tags(
            {
                f"caption_loss/{when}": repr(loss)
                for when, loss in losses.items()
                if loss is not None
            }
        )  # no one-bar charts; MLflow's eval/loss curve has both

    def save_adapter(self) -> None:
        """The aligned projector and its card in RUN/projector/ (rank 0)."""
        if not is_main():
            return
        self.guard.phase = "saving the projector"
        with after_training("saving the projector", self.folder):
            card = projector_card(self.cfg, self.metrics, self.folder.root)
            save_projector(self.model, self.folder.projector_dir, card)
        log.info("projector saved: %s", self.folder.projector_file)

    def evaluate(self) -> None:
        """Nothing more: the caption loss was measured with the training."""

    def save(self) -> None:
        """Rank 0: the description, metrics.json, and the run's files in MLflow."""
        from lmmtune.eval.description import describe_run

        cfg, folder, tracker = self.cfg, self.folder, self.tracker
        describe_run(tracker, cfg, self.train_cfg, self.metrics, self.report)
        with after_training("writing metrics.json", folder):
            write_text_atomic(folder.metrics, json.dumps(self.metrics, indent=2))
        redo = f"python -m lmmtune import {folder.root}"
        with after_training("logging the run to MLflow", folder, redo=redo):
            for artifact in (folder.config, folder.metrics, folder.projector_dir):
                tracker.log_artifact(artifact)


def check_projector_saving(model, train_cfg, samples: int, run_dir) -> None:
    """Before the first step: the projector can be written into the run and read back with
    its four keys; then the disk space its checkpoints need."""
    scratch = run_dir / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        save_projector(model, scratch, "dry run")
        keys = read_projector_keys(scratch / PROJECTOR_FILE)
        projector_bytes = folder_bytes(scratch)
    except OSError as exc:
        raise LmmtuneError(
            f"refused before training: the projector cannot be saved in {run_dir} ({exc}); "
            "the run could not keep its result"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if keys != sorted(PROJECTOR_WEIGHTS):
        raise LmmtuneError(
            f"refused before training: the model's projector has the weights {keys}, not "
            f"LLaVA 1.5's two-layer MLP ({', '.join(PROJECTOR_WEIGHTS)})"
        )
    check_space_for_checkpoints(model, projector_bytes, train_cfg, samples, run_dir)


def projector_card(cfg, metrics: dict, run_dir) -> str:
    """RUN/projector/README.md: what was aligned on what, the numbers, how to use it."""
    train, losses = metrics.get("train", {}), metrics.get("caption_loss", {})
    counts = metrics.get("data", {})
    before, after = losses.get("before"), losses.get("after")
    loss = f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "n/a"
    return "\n".join(
        [
            "# Aligned projector (LLaVA stage 1)",
            "",
            f"- Base model: `{cfg.model.path}` (the language model frozen, quantization "
            f"{cfg.quant.mode}; the vision tower frozen)",
            f"- Caption data: `{cfg.data.train}`: {counts.get('train_samples', '?')} captions "
            f"trained, {counts.get('eval_samples', 0)} held out",
            f"- Steps: {train.get('steps', '?')} (learning rate {cfg.train.learning_rate}, "
            f"{cfg.train.scheduler}, template `{cfg.data.template}`)",
            f"- Caption loss on the held-out captions: {loss}; final training loss "
            f"{train.get('loss', float('nan')):.4f}",
            "",
            "`projector.safetensors` holds llava-hf's keys (`multi_modal_projector.linear_1/2."
            "weight/bias`, fp32).",
            "",
            "## Use it",
            "",
            "Instruction-tune from it (stage 2):",
            "",
            "```bash",
            f"python -m lmmtune recipe=medical model.projector={run_dir} data.train=...",
            "```",
            "",
            "or load it into a llava-hf `LlavaForConditionalGeneration` of the same base:",
            "",
            "```python",
            "from safetensors.torch import load_file",
            "",
            "weights = load_file('projector.safetensors')",
            "model.model.multi_modal_projector.load_state_dict(",
            "    {key.removeprefix('multi_modal_projector.'): w for key, w in weights.items()}",
            ")",
            "```",
        ]
    )
