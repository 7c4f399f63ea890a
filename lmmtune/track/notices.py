"""Silence exactly the harmless notices every command showed, and nothing else; and no
library progress bars where no one watches them.

Installed by the command line before any command runs (the bitsandbytes notice comes at
its import). A filter on one logger and one warning message: other warnings of the same
libraries, and every other FutureWarning, still show.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward"
"""bitsandbytes tries the optional `kernels` package for a faster CPU 4-bit matmul and,
without it, uses its own implementation: nothing is wrong and nothing is to be done."""
CHECKPOINTING_NOTICE = r"`is_gradient_checkpointing` is deprecated"
"""peft asks transformers' deprecated property; the warning is for peft's authors."""


def _not_kernels_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(BNB_KERNELS_NOTICE)


def silence_harmless_notices() -> None:
    """Drop exactly the two notices every command showed; any other warning still shows."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_not_kernels_notice)  # added once, however often
    warnings.filterwarnings("ignore", message=CHECKPOINTING_NOTICE, category=FutureWarning)


BAR_SWITCHES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' "Loading weights"
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
"""Environment switches the libraries read for their bars."""


def library_bars_off_terminal() -> None:
    """When stderr is a file or a pipe, switch the libraries' bars off (unless the user set them)."""
    if not sys.stderr.isatty():
        for switch, off in BAR_SWITCHES.items():
            os.environ.setdefault(switch, off)
