"""`train.keep_best`: end a run with the adapter of its lowest eval loss, not its last.

Small domain sets overfit: the eval loss (`train.eval_steps`) falls, then rises
again. Whenever it reaches a new low, the trainable weights (LoRA, projector, and
the head where trained) are written to `RUN/best/` (staged, then renamed into
place, like checkpoints) with the step and loss in `best.json`. After training,
every process loads them back, so the saved adapter, the after-training evaluation
and the export all use the best weights. A resumed run reads `best.json` and keeps
comparing against it.

Own callback, not the Trainer's `load_best_model_at_end`: that one can only go back to a
full checkpoint (save_steps a multiple of eval_steps) and records the best checkpoint
under the staging folder our atomic checkpoints are written to, so it silently ends with
the last weights (or fails on save_total_limit=1).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from lmmtune.atomic import staged_directory

log = logging.getLogger(__name__)

BEST_DIR = "best"
WEIGHTS = "trainable.safetensors"
RECORD = "best.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().to("cpu", copy=True).contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


class KeepBestAdapter(TrainerCallback):
    """Snapshot the trainable weights at each new lowest eval loss; `restore` puts them back."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / BEST_DIR
        record = self.folder / RECORD
        self.best: dict | None = json.loads(record.read_text()) if record.exists() else None

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        if self.best is not None and loss >= self.best["eval_loss"]:
            return
        self.best = {"step": state.global_step, "eval_loss": float(loss)}
        if state.is_world_process_zero:
            self._save(trainable_state(model))
            log.info("new lowest eval loss %.4f at step %d: kept", loss, state.global_step)

    def _save(self, weights: dict[str, torch.Tensor]) -> None:
        with staged_directory(self.folder, replace=True) as staging:
            staging.mkdir()
            save_file(weights, str(staging / WEIGHTS))
            (staging / RECORD).write_text(json.dumps(self.best))

    def restore(self, model: torch.nn.Module) -> dict | None:
        """Load the best weights into `model`; the {step, eval_loss} they came from, or None."""
        if self.best is None or not (self.folder / WEIGHTS).exists():
            return None
        saved = load_file(str(self.folder / WEIGHTS))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in saved:
                    parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
        log.info(
            "train.keep_best: the adapter of step %d (eval loss %.4f) is the run's adapter",
            self.best["step"],
            self.best["eval_loss"],
        )
        return self.best
