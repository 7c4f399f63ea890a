"""A Tracker on a real sqlite store: where a new experiment keeps its artifacts, and system
metrics of a run shorter than MLflow's sampling interval."""

from __future__ import annotations

import ast
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmmtune.config import TrackingConfig
from lmmtune.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[2]


def test_artifacts_go_beside_the_sqlite_database_not_into_the_working_directory(
    tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere/m.db")
    (work / "elsewhere").mkdir()
    (work / "notes.txt").write_text("a file to log")

    tracker = Tracker()
    tracker.start_run(TrackingConfig(), "beside", "run")
    tracker.log_artifact(work / "notes.txt", "files")
    tracker.end("FINISHED")

    logged = work / "elsewhere" / "mlruns" / "beside"
    assert [p.name for p in logged.rglob("notes.txt")] == ["notes.txt"]
    assert not (work / "mlruns").exists()
    experiment = MlflowClient("sqlite:///elsewhere/m.db").get_experiment_by_name("beside")
    assert experiment.artifact_location == logged.as_uri()


def test_a_run_shorter_than_the_sampling_interval_has_system_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.monotonic()

    tracker = Tracker()
    tracker.start_run(TrackingConfig(tracking_uri=uri), "short", "run")
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.end("FINISHED")

    assert time.monotonic() - started < 10  # MLflow samples every 10 s
    metrics = MlflowClient(uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


TOOLS = {"mlflow", "torchrun", "accelerate", "python", "python3", "pytest", "gradio", "ruff"}


def test_tools_are_started_with_this_python_not_from_path():
    """`python -m TOOL`, not `TOOL`: with a virtual environment's python called directly (not
    activated), its scripts are not on PATH."""
    found = []
    for path in [*REPO.glob("lmmtune/**/*.py"), *REPO.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List) and node.elts:
                first = node.elts[0]
                if isinstance(first, ast.Constant) and first.value in TOOLS:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {first.value}")
    assert not found, "\n".join(found)
