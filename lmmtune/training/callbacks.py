"""Trainer callbacks: stop cleanly on a signal or a non-finite loss, keep the best adapter, print one line per step.

Trainer callbacks that stop a run cleanly: on SIGINT/SIGTERM, and on a non-finite loss or gradient.

`train.keep_best`: end a run with the adapter of its lowest eval loss, not its last.

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

What training prints: progress bars on a terminal, one plain line per logging step in a
file or a pipe.

The Trainer's own non-terminal output (`PrinterCallback`) prints a Python dict whose
numbers are strings; `StepLines` writes one log line per logging step instead, the
numbers as JSON numbers, so `grep`/`jq` read a training log as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PrinterCallback, TrainerCallback

from lmmtune.errors import LmmtuneError, SignalStop
from lmmtune.rundir.files import staged_directory

log = logging.getLogger(__name__)


class NonFiniteError(LmmtuneError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class StopOnSignal(TrainerCallback):
    """On SIGINT/SIGTERM finish the current step, save a checkpoint and stop training.

    A second signal changes nothing: the checkpoint is still saved and the run marked
    (a service manager sends SIGTERM again before its kill). `kill -9` stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> StopOnSignal:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            log.warning(
                "%s received again: still saving a checkpoint after this step (kill -9 stops "
                "at once, without one)",
                signal.Signals(signum).name,
            )
            return
        self.received = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping",
            signal.Signals(signum).name,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class InterruptOutsideTraining:
    """Outside the training loop (data, model, evaluation), SIGINT/SIGTERM raise SignalStop
    naming the phase and the resume command, so the run is marked KILLED and no traceback shows.

    `phase` says what is running; the training loop installs `StopOnSignal` over this.
    """

    def __init__(self, resume_hint: str):
        self.resume_hint = resume_hint
        self.phase = "preparing the run"
        self._previous: dict = {}

    def __enter__(self) -> InterruptOutsideTraining:
        for signum in StopOnSignal.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        # Raised once: a second signal while the first unwinds must not break the cleanup.
        for other in StopOnSignal.SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise SignalStop(f"{name} while {self.phase}: stopped. {self.resume_hint}", signum)


@contextlib.contextmanager
def stop_signals_held():
    """Ignore SIGINT/SIGTERM while the tracked run ends: a signal raised inside MLflow's
    `end_run` (a service manager sends SIGTERM twice) would leave the run open, and MLflow's
    exit hook would then mark a stopped run FINISHED. Only the main thread sets handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in StopOnSignal.SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopOnNonFinite(TrainerCallback):
    """Stop at the first NaN/inf loss or gradient, before the optimizer applies it."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                raise NonFiniteError(self._message(state.global_step + 1, f"gradient of {name}"))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteError(self._message(state.global_step, f"loss {loss}"))
        return control

    @staticmethod
    def _message(step: int, what: str) -> str:
        return (
            f"non-finite {what} at step {step}: training stopped, the last good checkpoint is kept. "
            "Lower train.learning_rate, check the data, or use bf16 instead of fp16."
        )


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


step_log = logging.getLogger("lmmtune.train")
"""The training log's step lines (`lmmtune.train: step 10/208 {...}`)."""


def progress_bars() -> bool:
    """Bars only where a person watches them: stderr is a terminal."""
    return sys.stderr.isatty()


class StepLines(TrainerCallback):
    """One log line per logging step: `step 10/208 {"loss": 0.53, "grad_norm": 0.44, ...}`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            numbers = {key: _number(value) for key, value in logs.items()}
            step_log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(numbers))


def _number(value):
    """Floats to 4 significant digits, still numbers; anything else as it is."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def use_step_lines(trainer) -> None:
    """Where the Trainer shows no bars (`disable_tqdm`), log `StepLines` instead of its dicts."""
    if trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(StepLines())
