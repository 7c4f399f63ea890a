"""One fault policy for every tracked command: when MLflow is down, train, eval and export go
on, keep a local record, and `python -m lmmtune import` completes it later."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.rundir.folders import claim_folder, read_manifest
from lmmtune.tracking.importing import checked_events, plan_import
from lmmtune.tracking.importing import main as import_main
from lmmtune.tracking.tracker import LocalRecord, start_tracker

DOWN = TrackingConfig(tracking_uri="http://127.0.0.1:9")  # nothing listens on port 9


def import_into(folder: Path, uri: str, capsys) -> str:
    import_main([str(folder), "--tracking-uri", uri])
    return capsys.readouterr().out


def runs_of(uri: str, experiment: str) -> dict:
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {run.info.run_name: run for run in found}


@pytest.mark.parametrize("doing", ["the evaluation", "the export"])
def test_eval_and_export_keep_a_record_that_imports_without_a_run_config(
    doing, tmp_path, caplog, capsys
):
    caplog.set_level(logging.WARNING)
    folder = tmp_path / "out"
    tracker = start_tracker(DOWN, "exp", "run-eval", folder, doing, only_if_needed=True)
    tracker.set_tags({"command": "eval"})
    tracker.log_metrics({"parity/max_abs_diff": 0.25}, step=None)
    tracker.end("FINISHED")

    warning = caplog.text
    assert f"{doing} goes on" in warning and f"python -m lmmtune import {folder}" in warning
    state = json.loads((folder / "tracking.json").read_text())
    assert state == {"run_id": None, "experiment": "exp", "run_name": "run-eval"}
    assert not (folder / "config.yaml").exists()  # an eval or export record has none

    uri = f"sqlite:///{tmp_path}/later.db"
    assert "imported 2 calls" in import_into(folder, uri, capsys)
    run = runs_of(uri, "exp")["run-eval (imported)"]
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "eval"
    assert run.data.metrics["parity/max_abs_diff"] == 0.25
    assert "nothing to import" in import_into(folder, uri, capsys)  # twice: nothing twice


def test_an_export_record_is_written_beside_the_model_only_when_mlflow_missed_a_call(tmp_path):
    healthy = tmp_path / "export-merged.tracking-1"
    store = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    tracker = start_tracker(store, "e", "x", healthy, "the export", only_if_needed=True)
    tracker.log_metrics({"parity/max_abs_diff": 0.0}, step=None)
    tracker.end("FINISHED")
    assert not healthy.exists()  # MLflow got everything: nothing beside the model
    assert MlflowClient(store.tracking_uri).get_run(tracker.run_id).info.status == "FINISHED"

    missed = tmp_path / "export-merged.tracking-2"
    tracker = start_tracker(DOWN, "e", "x", missed, "the export", only_if_needed=True)
    tracker.log_params({"export.format": "merged"})
    tracker.log_artifact(tmp_path / "export-merged" / "export_report.json", "export")
    tracker.end("FAILED")  # a failed export keeps its record too: the folder is its own
    events = [json.loads(line) for line in (missed / "tracking_record.jsonl").open()]
    assert [e["method"] for e in events] == ["log_params", "log_artifact", "end"]
    assert events[1]["args"][0] == str(tmp_path / "export-merged" / "export_report.json")
    assert read_manifest(missed) == {
        "kind": "tracking",
        "files": ["tracking.json", "tracking_record.jsonl"],
    }


def test_a_model_upload_that_fails_is_not_sent_again(tmp_path):
    """A failed call is retried after 1 s and 4 s, but not a model upload (gigabytes, perhaps
    half registered): it fails over to the record at once, for the import to send once."""
    import time

    store = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    tracker = start_tracker(store, "e", "x", tmp_path / "record", "the export")
    started = time.monotonic()
    assert tracker.log_model(tmp_path / "no-such-export", None) is None
    assert time.monotonic() - started < 4.0 and tracker.failed_reason is not None
    (event,) = [json.loads(line) for line in (tmp_path / "record/tracking_record.jsonl").open()]
    assert event["method"] == "log_model" and not event["delivered"]
    assert event["run_id"] == tracker.run_id  # the import completes that run
    tracker.end("FINISHED")


def test_a_resume_with_mlflow_down_keeps_the_run_it_continues(tmp_path):
    (tmp_path / "tracking.json").write_text(json.dumps({"run_id": "abc123"}))
    tracker = start_tracker(DOWN, "demo", "run", tmp_path, resume=True)
    tracker.log_metrics({"train/loss": 1.0}, step=5)
    assert json.loads((tmp_path / "tracking.json").read_text())["run_id"] == "abc123"
    (event,) = LocalRecord(tmp_path).events()
    assert event["run_id"] == "abc123"  # the import completes that run, not a new one


def test_tracking_off_sends_and_writes_nothing(tmp_path):
    from lmmtune.config import TrackingBackend

    off = TrackingConfig(backend=TrackingBackend.none)
    tracker = start_tracker(off, "e", "x", tmp_path / "t", "the export")
    tracker.log_metrics({"parity/max_abs_diff": 0.0}, step=None)
    assert tracker.log_model(tmp_path, "demo-model") is None
    tracker.end("FINISHED")
    assert tracker.run_id is None and not (tmp_path / "t").exists()


def test_registering_refuses_to_start_when_mlflow_is_down(tmp_path):
    with pytest.raises(LmmtuneError, match="export.register_name needs MLflow.*127.0.0.1:9"):
        start_tracker(
            DOWN, "e", "x", tmp_path / "t", required_for="export.register_name needs MLflow"
        )
    assert not (tmp_path / "t").exists()


def test_a_killed_eval_leaves_nothing_the_next_one_continues(tmp_path):
    """Tracking files are listed before they are written: after a kill, `eval.overwrite=true`
    clears them, and an eval never continues an MLflow run a folder names (training does)."""
    path = tmp_path / "eval"
    claim_folder(path, "eval", False, "eval.output", "eval.overwrite")
    start_tracker(DOWN, "exp", "first", path, "the evaluation").log_metrics({"a": 1.0})
    # killed here: no end status, no listing of the files at the end
    assert {"tracking.json", "tracking_record.jsonl"} <= set(read_manifest(path)["files"])
    claim_folder(path, "eval", True, "eval.output", "eval.overwrite")
    assert sorted(p.name for p in path.iterdir()) == [".lmmtune.json"]

    (path / "tracking.json").write_text(json.dumps({"run_id": "left-by-an-older-lmmtune"}))
    tracker = start_tracker(DOWN, "exp", "second", path, "the evaluation")
    assert tracker.run_id is None


def test_an_imported_eval_folder_is_cleared_whole_by_overwrite(tmp_path, capsys):
    """The import's state is listed in the folder's manifest: left behind by
    `eval.overwrite=true`, it would mark the next evaluation's calls as imported already."""
    path = tmp_path / "eval"
    claim_folder(path, "eval", False, "eval.output", "eval.overwrite")
    tracker = start_tracker(DOWN, "exp", "first", path, "the evaluation")
    tracker.log_metrics({"eval/accuracy": 0.5}, step=None)
    tracker.end("FINISHED")
    import_into(path, f"sqlite:///{tmp_path}/mlflow.db", capsys)
    assert "tracking_import.json" in read_manifest(path)["files"]

    claim_folder(path, "eval", True, "eval.output", "eval.overwrite")  # the next evaluation
    assert sorted(p.name for p in path.iterdir()) == [".lmmtune.json"]
    tracker = start_tracker(DOWN, "exp", "second", path, "the evaluation")
    tracker.log_metrics({"eval/accuracy": 0.75}, step=None)
    tracker.end("FINISHED")
    pending, run_id = plan_import(path, checked_events(path), f"sqlite:///{tmp_path}/mlflow.db")
    assert len(pending) == 2 and run_id is None  # a new run, not the first eval's


def test_an_interrupted_import_goes_on_in_the_same_run_without_doubles(tmp_path, capsys):
    folder = tmp_path / "eval"
    folder.mkdir()
    tracker = start_tracker(DOWN, "exp", "run-eval", folder, "the evaluation")
    tracker.log_metrics({"eval/accuracy": 0.5}, step=1)
    tracker.log_artifact(folder / "metrics.json", "eval")  # not there yet: the import stops
    tracker.log_metrics({"eval/accuracy": 0.75}, step=2)
    tracker.end("FINISHED")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(SystemExit):
        import_into(folder, uri, capsys)
    assert "goes on where it stopped" in capsys.readouterr().err
    (folder / "metrics.json").write_text("{}")
    import_into(folder, uri, capsys)

    (run,) = runs_of(uri, "exp").values()
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert run.info.status == "FINISHED"
    files = [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "eval")]
    assert files == ["eval/metrics.json"]


def test_importing_a_run_takes_its_eval_and_missed_export_records_along(tmp_path, capsys):
    run = tmp_path / "run"
    claim_folder(run, "run", False, "output_dir", "overwrite")
    start_tracker(DOWN, "demo", "run", run, resume=True).end("FINISHED")
    claim_folder(run / "eval", "eval", False, "eval.output", "eval.overwrite")
    (run / "notes").mkdir()
    folders = {
        "eval": run / "eval",
        "export": run / "export-merged.tracking-20260101-120000",  # made by the record
        "notes": run / "notes",  # a user's folder: never imported
    }
    for name, folder in folders.items():
        tracker = start_tracker(DOWN, "demo", f"run-{name}", folder, only_if_needed=True)
        tracker.log_metrics({f"{name}/score": 1.0}, step=1)
        tracker.end("FINISHED")

    out = import_into(run, f"sqlite:///{tmp_path}/mlflow.db", capsys)
    runs = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "demo")
    assert set(runs) == {"run (imported)", "run-eval (imported)", "run-export (imported)"}, out
    assert runs["run-eval (imported)"].data.metrics == {"eval/score": 1.0}
    assert runs["run-export (imported)"].data.metrics == {"export/score": 1.0}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "is not a folder"),
        (lambda tmp: tmp, "holds no tracking record (tracking_record.jsonl)"),
    ],
)
def test_import_of_a_folder_without_a_record_says_why_in_one_line(make, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        import_main([str(make(tmp_path)), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("lmmtune import: error:") and message in err and len(err.splitlines()) == 1
    )


@pytest.mark.slow  # three CLI commands on a copy of the demo run: run by CI's slow step
def test_eval_and_export_with_mlflow_down_finish_and_import_later(demo_run, tmp_path):
    import shutil

    from lmmtune.rundir.folders import foreign_files
    from tests.conftest import run_cli

    shutil.copytree(demo_run["run_dir"], tmp_path / "run")  # eval/ and export-* of other tests
    for leftover in ("eval", "export-merged", "export-adapter"):
        shutil.rmtree(tmp_path / "run" / leftover, ignore_errors=True)
    # The training reached MLflow; its record names files where the demo run was written,
    # and an import uploads files of a record's own folder only: import what eval and export
    # record here.
    (tmp_path / "run" / "tracking_record.jsonl").unlink()
    down = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    evaluated = run_cli(["eval", "output_dir=run"], cwd=tmp_path, env=down)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "the evaluation goes on" in evaluated.stderr
    exported = run_cli(["export", "output_dir=run"], cwd=tmp_path, env=down)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "the export goes on" in exported.stderr
    (record,) = (tmp_path / "run").glob("export-merged.tracking-*")  # beside the model
    assert not list((tmp_path / "run" / "export-merged").glob("tracking*"))  # shared: kept clean
    for folder in (tmp_path / "run" / "eval", tmp_path / "run" / "export-merged", record):
        assert foreign_files(folder) == []  # overwrite=true replaces them whole later
    assert "tracking_record.jsonl" in read_manifest(tmp_path / "run" / "eval")["files"]

    registering = run_cli(
        ["export", "output_dir=run", "export.dir=registered", "export.register_name=demo-model"],
        cwd=tmp_path,
        env=down,
    )
    assert registering.returncode == 1 and "export.register_name needs MLflow" in registering.stderr
    assert "Traceback" not in registering.stderr and not (tmp_path / "registered").exists()

    uri = f"sqlite:///{tmp_path}/later.db"
    imported = run_cli(["import", "run", "--tracking-uri", uri], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-3000:]
    runs = runs_of(uri, "demo")
    assert set(runs) == {"run-eval (imported)", "run-export (imported)"}  # training reached MLflow
    evaluation, export = runs["run-eval (imported)"], runs["run-export (imported)"]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    accuracy = metrics["eval_after"]["accuracy"]
    assert float(evaluation.data.tags["eval_after/accuracy"]) == pytest.approx(accuracy)
    client = MlflowClient(uri)
    files = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval")}
    assert {"eval/predictions.json", "eval/metrics.json"} <= files
    assert export.data.metrics["parity/argmax_agreement"] == 1.0
    models = client.search_logged_models([export.info.experiment_id])
    assert [m.source_run_id for m in models] == [export.info.run_id]  # the pyfunc model


@pytest.mark.slow  # an export and an import of the demo model: run by CI's slow step
def test_a_registration_that_fails_mid_export_keeps_the_export_and_imports_later(
    demo_run, tmp_path
):
    """MLflow answers at the start but cannot store artifacts (its artifact folder is blocked
    by a file): the export is kept, exits 1 naming its record, and the import, once the
    store works, logs and registers the model in the export's own MLflow run."""
    from tests.conftest import run_cli

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    blocker = tmp_path / "artifact-store"
    blocker.write_text("a file where MLflow wants a folder")
    MlflowClient(uri).create_experiment("registry", artifact_location=str(blocker / "runs"))
    args = [f"output_dir={demo_run['run_dir']}", f"export.dir={tmp_path / 'exported'}"]
    args += ["tracking.experiment=registry", "export.register_name=demo-model"]
    exported = run_cli(["export", *args], cwd=tmp_path)
    assert exported.returncode == 1, exported.stderr[-3000:]
    (record,) = tmp_path.glob("exported.tracking-*")
    message = exported.stderr.strip().splitlines()[-1]
    assert "registering it as 'demo-model' failed" in message and str(record) in message
    assert (tmp_path / "exported" / "model.safetensors").exists()  # the export is kept
    assert not list((tmp_path / "exported").glob("tracking*"))

    blocker.unlink()  # the store works again
    imported = run_cli(["import", str(record), "--tracking-uri", uri], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-3000:]
    client = MlflowClient(uri)
    version = client.get_model_version("demo-model", "1")
    run = client.get_run(version.run_id)
    assert run.info.run_id == json.loads((record / "tracking.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "export"


def test_a_second_sigterm_while_the_run_ends_still_marks_it_killed(tmp_path, monkeypatch):
    """A service manager sends SIGTERM twice: the second one, arriving while MLflow ends the
    run, used to escape from `end_run` and leave the run to MLflow's exit hook (FINISHED)."""
    import os
    import signal

    from lmmtune.errors import RunInterrupted
    from lmmtune.tracking import mlflow_run as mlflow_tracker
    from lmmtune.tracking import tracker
    from lmmtune.training.callbacks import InterruptOutsideTraining

    def signal_while_ending(run_id):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in the main thread

    monkeypatch.setattr(tracker, "log_last_system_sample", signal_while_ending)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_tracker(TrackingConfig(tracking_uri=uri), "exp", "run", tmp_path)
    # KeyboardInterrupt too: without the fix the second signal escapes as one (SignalStop)
    with (
        pytest.raises((RunInterrupted, KeyboardInterrupt)),
        InterruptOutsideTraining("hint"),
        mlflow_tracker.tracked_run(run),
    ):
        raise RunInterrupted("SIGTERM: stopped after step 3", signal.SIGTERM)
    assert MlflowClient(uri).get_run(run.run_id).info.status == "KILLED"
