"""What a command prints when its output goes to a file: one line per logging step with
numbers as numbers, no progress-bar frames, and no harmless notices, other warnings kept."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def step_lines(stderr: str) -> list[dict]:
    marker = " lmmtune.train: step "
    return [
        json.loads(line.split(marker)[1].split(" ", 1)[1])
        for line in stderr.splitlines()
        if marker in line
    ]


def test_training_log_in_a_file_is_one_line_per_logging_step(demo_run):
    result = demo_run["result"]
    assert "\r" not in result.stderr and "it/s]" not in result.stderr  # no tqdm frames
    assert "{'loss'" not in result.stdout + result.stderr  # no dicts of strings
    logged = step_lines(result.stderr)
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    history = json.loads((demo_run["run_dir"] / "metrics.json").read_text())["train"]
    assert len(losses) == len(history["loss_history"])
    assert all(isinstance(value, float) for value in losses)
    assert losses[0] == float(f"{history['loss_history'][0]:.4g}")
    assert logged[-1]["train_runtime"] > 0  # the Trainer's closing summary, a line too


def test_demo_run_shows_no_harmless_notices(demo_run):
    stderr = demo_run["result"].stderr
    assert "gemm_4bit_forward" not in stderr
    assert "is_gradient_checkpointing" not in stderr


def test_only_the_harmless_notices_are_silenced():
    script = """
import logging, warnings
from lmmtune.cli import setup_logging
setup_logging()
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no 'kernels'")
bnb.warning("Failed to load CPU int8 kernel")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
warnings.warn("`other_property` is deprecated and will be removed", FutureWarning)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr
    assert "is_gradient_checkpointing" not in done.stderr
    assert "Failed to load CPU int8 kernel" in done.stderr
    assert "`other_property` is deprecated" in done.stderr
