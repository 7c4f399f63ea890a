"""A DPO run killed with SIGKILL resumes from its last checkpoint (projector still frozen)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, run_cli


@pytest.mark.slow
def test_dpo_run_resumes_after_kill_9(demo_run, tmp_path):
    args = [
        "recipe=demo_dpo",
        f"dpo.init_adapter={demo_run['run_dir'] / 'adapter'}",
        "output_dir=run",
        "train.save_steps=5",
        "tracking.backend=none",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "lmmtune", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-10"
    deadline = time.monotonic() + 900
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert checkpoint.exists() and not (tmp_path / "run" / "metrics.json").exists()

    resumed = run_cli([*args, "train.resume=auto"], cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 20
    assert metrics["preference_after"]["rewards/accuracies"] >= 0.9
