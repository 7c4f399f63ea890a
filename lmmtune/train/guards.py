"""Trainer callbacks that stop a run cleanly: on SIGINT/SIGTERM, and on a non-finite loss or gradient."""

from __future__ import annotations

import logging
import math
import signal

import torch
from transformers import TrainerCallback

from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)


class NonFiniteError(LmmtuneError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class StopOnSignal(TrainerCallback):
    """On SIGINT/SIGTERM finish the current step, save a checkpoint and stop training.

    A second signal of the same kind falls back to the default (immediate) behaviour.
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
            self.uninstall()
            signal.raise_signal(signum)
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
