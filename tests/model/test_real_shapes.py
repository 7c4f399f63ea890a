"""LLaVA-1.5-7B's width (reduced depth, random weights, the real tokenizer) through the plain
CLI on a CPU: check -> 4-bit LoRA r=128 training -> eval -> export with parity -> transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real_tokenizer import real_processor_dir

ROOT = Path(__file__).parent.parent.parent


@pytest.mark.slow  # minutes: 7B-wide layers on a CPU
@pytest.mark.heavy  # not in CI
def test_7b_width_runs_the_cli_end_to_end(tmp_path):
    real_processor_dir(False)  # skips here where npm cannot be reached
    out = tmp_path / "real-shapes"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "real_shapes.py"),
            "--out",
            str(out),
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["plain_transformers"] == {"image_tokens": 576, "new_tokens": 2}
    assert "parity" in report["export_log_tail"] and report["step_seconds"] > 0
    layer = report["layer_4bit"]
    assert 0.97 < layer["measured_over_modelled"] < 1.03  # memory.py's 4.127 bits per weight
    assert layer["measured_bytes"] < layer["bf16_bytes"] / 3.5
    assert max(c["peak_rss_gib"] for c in report["commands"].values()) < 16
