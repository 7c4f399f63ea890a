"""Faults against real processes and a real MLflow store: kill -9, SIGTERM, NaN, MLflow down, OOM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lmmtune.rundir.run import completed_checkpoints
from tests.conftest import run_cli

FAST = [
    "recipe=demo",
    "data.demo_size=40",
    "train.max_steps=12",
    "train.batch_size=4",
    "train.save_steps=4",
    "train.save_total_limit=2",
    "train.logging_steps=1",
    "eval.before=false",
    "eval.after=false",
    "data.num_workers=0",
]


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "lmmtune", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(
    run_dir: Path, process: subprocess.Popen, timeout: float = 300, min_step: int = 0
) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [
            c
            for c in completed_checkpoints(run_dir / "checkpoints")
            if int(c.name.split("-")[1]) >= min_step
        ]
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    raise TimeoutError("no checkpoint appeared")


def kill_9_at_checkpoint(
    args: list[str], cwd: Path, run_dir: Path, min_step: int
) -> tuple[Path, str]:
    """Start `python -m lmmtune ARGS` and kill -9 it once `run_dir` (a run, or a stage of a
    two-stage run) holds a finished checkpoint of `min_step` or later, before the run
    finished; that checkpoint and the process's log."""
    process = start_cli(args, cwd=cwd)
    checkpoint = wait_for_checkpoint(run_dir, process, min_step=min_step)
    process.send_signal(signal.SIGKILL)
    _, log = process.communicate()
    assert not (run_dir / "metrics.json").exists(), "the run finished before the kill"
    return checkpoint, log


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# 38 training records, batch 4: 10 steps an epoch; 25 steps end in the third epoch.
LATER_EPOCH = [*FAST, "train.max_steps=25", "train.save_steps=5"]


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_resume_after_kill_9_in_a_later_epoch_matches_an_uninterrupted_run(tmp_path):
    reference = run_cli([*LATER_EPOCH, "output_dir=straight"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = [*LATER_EPOCH, "output_dir=crashed"]
    first, _ = kill_9_at_checkpoint(crashed, tmp_path, tmp_path / "crashed", 15)  # mid epoch 2
    assert int(first.name.split("-")[1]) > 10, "killed in the first epoch"
    run_id = json.loads((tmp_path / "crashed" / "tracking.json").read_text())["run_id"]

    resumed = run_cli([*LATER_EPOCH, "output_dir=crashed", "train.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and first.name in resumed.stderr

    expected, got = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "crashed")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)

    # The same MLflow run goes on and ends FINISHED with the whole loss history.
    assert json.loads((tmp_path / "crashed" / "tracking.json").read_text())["run_id"] == run_id
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert set(steps) >= set(range(1, 26))
    assert len(steps) == len(set(steps)), "a replayed step was logged twice"
    # metrics.json's loss covers the whole run, not only the steps after the resume
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())["train"]
    crashed = json.loads((tmp_path / "crashed" / "metrics.json").read_text())["train"]
    assert straight["loss"] == pytest.approx(
        sum(straight["loss_history"]) / len(straight["loss_history"]), rel=1e-4
    )
    assert crashed["loss"] == pytest.approx(straight["loss"], rel=1e-4)


def test_sigterm_saves_a_checkpoint_marks_the_run_killed_and_says_how_to_resume(tmp_path):
    process = start_cli(
        [*FAST, "train.max_steps=400", "train.save_steps=1000", "output_dir=run"], cwd=tmp_path
    )
    deadline = time.time() + 300
    while (
        not (tmp_path / "run" / "tracking_record.jsonl").exists()
        or "train/loss" not in (tmp_path / "run" / "tracking_record.jsonl").read_text()
    ):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # again, as a service manager does: still a checkpoint
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "train.resume=auto" in stderr and "Traceback" not in stderr
    checkpoints = completed_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 400
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_evaluation_marks_the_run_killed_with_the_resume_command(
    tmp_path, signum
):
    args = [*FAST, "data.demo_size=200", "data.eval_fraction=0.5", "eval.before=true"]
    args += ["eval.batch_size=1", "eval.max_new_tokens=32"]  # an evaluation of many seconds
    process = start_cli([*args, "output_dir=run"], cwd=tmp_path)
    tracking = tmp_path / "run" / "tracking.json"
    deadline = time.time() + 300
    while not tracking.exists() or not tracking.read_text():  # the evaluation starts next
        assert time.time() < deadline and process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "train.resume=auto" in stderr.splitlines()[-1]
    assert not (tmp_path / "run" / "eval_before.json").exists(), "the evaluation had finished"
    run_id = json.loads(tracking.read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_cli(
        [
            *FAST,
            "train.learning_rate=1e12",
            "train.warmup_ratio=0",
            "train.save_steps=1",
            "train.max_grad_norm=0",
            "output_dir=run",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "non-finite" in result.stderr and "at step" in result.stderr
    assert "Traceback" not in result.stderr
    step = int(result.stderr.split("at step ")[1].split(":")[0])
    checkpoints = completed_checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == step - 1
    weights = load_file(checkpoints[-1] / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "FAILED"


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_unreachable_mlflow_server_falls_back_to_a_local_record_that_imports(tmp_path):
    result = run_cli(
        [*FAST, "output_dir=run"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not start" in result.stderr and "training goes on" in result.stderr
    assert "python -m lmmtune import run" in result.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()

    store = f"sqlite:///{tmp_path}/later.db"
    imported = subprocess.run(
        [sys.executable, "-m", "lmmtune", "import", "run", "--tracking-uri", store],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("demo").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "12"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 12
    assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_locked_sqlite_mid_run_keeps_everything_in_the_record(tmp_path):
    import mlflow

    from lmmtune.config import TrackingConfig
    from lmmtune.tracking.tracker import start_tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = start_tracker(TrackingConfig(tracking_uri=uri), "exp", "r", tmp_path)
    tracker.log_metrics({"train/loss": 3.0}, step=1)
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    tracker.log_metrics(
        {"train/loss": 2.0}, step=2
    )  # blocks for the store's timeout, then falls back
    assert "locked" in tracker.failed_reason
    assert mlflow.active_run() is None  # let go of in this process: a next run may start
    tracker.log_metrics({"train/loss": 1.0}, step=3)
    tracker.end("FINISHED")
    lock.execute("ROLLBACK")
    lock.close()

    (tmp_path / "config.yaml").write_text("name: exp\n")
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # MLflow lost contact

    def import_record() -> str:
        imported = subprocess.run(
            [sys.executable, "-m", "lmmtune", "import", str(tmp_path), "--tracking-uri", uri],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert imported.returncode == 0, imported.stderr[-2000:]
        return imported.stdout

    assert f"into MLflow run {tracker.run_id}" in import_record()  # the original run, completed
    assert "nothing to import" in import_record()  # twice: no duplicate run, no value twice
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_out_of_memory_message_says_what_to_lower():
    from transformers import TrainingArguments

    from lmmtune.stages.sft import out_of_memory_message

    args = TrainingArguments(
        output_dir="x", per_device_train_batch_size=8, use_cpu=True, report_to="none"
    )
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nlong trace")
    message = out_of_memory_message(args, error)
    assert "Tried to allocate 2.00 GiB" in message and "long trace" not in message
    assert "train.batch_size (now 8)" in message and "train.gpu_memory_gb" in message


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_like_folder_without_a_manifest_is_never_written_or_cleared(tmp_path, overwrite):
    from lmmtune.errors import LmmtuneError
    from lmmtune.rundir.run import prepare_run_dir

    (tmp_path / "config.yaml").write_text("name: old\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("weights")
    (tmp_path / "export-merged").mkdir()
    (tmp_path / "eval_predictions.jsonl").write_text("{}\n")
    (tmp_path / "my_notes.txt").write_text("the user's own file")
    # No manifest of the files lmmtune wrote: not lmmtune's folder, however run-like it looks.
    with pytest.raises(LmmtuneError, match="is not an lmmtune run"):
        prepare_run_dir(tmp_path, overwrite=overwrite, resume=None)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "weights"
    assert (tmp_path / "my_notes.txt").exists()


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    from lmmtune.rundir.run import STAGING, find_resume_checkpoint

    root = tmp_path / "checkpoints"
    (root / "checkpoint-4").mkdir(parents=True)
    (root / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (root / STAGING / "checkpoint-8").mkdir(parents=True)  # crash during the save of step 8
    (root / "checkpoint-12").mkdir()  # no trainer state: not finished
    assert find_resume_checkpoint(root, "auto") == root / "checkpoint-4"
