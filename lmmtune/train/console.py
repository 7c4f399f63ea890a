"""What training prints: progress bars on a terminal, one plain line per logging step in a
file or a pipe.

The Trainer's own non-terminal output (`PrinterCallback`) prints a Python dict whose
numbers are strings; `StepLines` writes one log line per logging step instead, the
numbers as JSON numbers, so `grep`/`jq` read a training log as it is.
"""

from __future__ import annotations

import json
import logging
import sys

from transformers import PrinterCallback, TrainerCallback

log = logging.getLogger("lmmtune.train")


def progress_bars() -> bool:
    """Bars only where a person watches them: stderr is a terminal."""
    return sys.stderr.isatty()


class StepLines(TrainerCallback):
    """One log line per logging step: `step 10/208 {"loss": 0.53, "grad_norm": 0.44, ...}`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            numbers = {key: _number(value) for key, value in logs.items()}
            log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(numbers))


def _number(value):
    """Floats to 4 significant digits, still numbers; anything else as it is."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def use_step_lines(trainer) -> None:
    """Where the Trainer shows no bars (`disable_tqdm`), log `StepLines` instead of its dicts."""
    if trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(StepLines())
