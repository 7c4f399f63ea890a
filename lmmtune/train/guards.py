"""Trainer callbacks that stop a run cleanly: on SIGINT/SIGTERM, and on a non-finite loss or gradient."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading

import torch
from transformers import TrainerCallback

from lmmtune.errors import LmmtuneError, SignalStop

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
