"""One fault policy for every tracked command: when MLflow is down, train, eval and export go
on, keep a local record in their own folder, and `python -m lmmtune import` completes it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.owned import claim_folder, listed_when_done, read_manifest
from lmmtune.track.importing import main as import_main
from lmmtune.track.importing import pending_events
from lmmtune.track.tracker import start_tracker

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
    folder.mkdir()
    tracker = start_tracker(DOWN, "exp", "run-eval", folder, doing)
    tracker.set_tags({"command": "eval"})
    tracker.log_metrics({"parity/max_abs_diff": 0.25}, step=None)
    tracker.end("FINISHED")

    warning = caplog.text
    assert f"{doing} goes on" in warning and f"python -m lmmtune import {folder}" in warning
    state = json.loads((folder / "tracking.json").read_text())
    assert state == {"run_id": None, "experiment": "exp", "run_name": "run-eval"}
    assert not (folder / "config.yaml").exists()  # an eval or export folder holds none

    uri = f"sqlite:///{tmp_path}/later.db"
    assert "imported 2 calls" in import_into(folder, uri, capsys)
    run = runs_of(uri, "exp")["run-eval (imported)"]
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "eval"
    assert run.data.metrics["parity/max_abs_diff"] == 0.25
    assert "nothing to import" in import_into(folder, uri, capsys)  # twice: nothing twice


def test_a_record_kept_in_memory_lands_whole_in_the_folder_it_is_given(tmp_path):
    tracker = start_tracker(DOWN, "exp", "run-export", None, "the export")
    tracker.log_params({"export.format": "merged"})
    folder = tmp_path / "export-merged"  # appears only when the export is complete
    folder.mkdir()
    tracker.keep_record_in(folder)
    tracker.log_artifact(folder / "export_report.json", "export")
    tracker.end("FINISHED")

    events = [json.loads(line) for line in (folder / "tracking_record.jsonl").open()]
    assert [e["method"] for e in events] == ["log_params", "log_artifact", "end"]
    assert events[1]["args"][0] == str((folder / "export_report.json").absolute())
    assert json.loads((folder / "tracking.json").read_text())["run_name"] == "run-export"


def test_a_shared_model_folder_gets_no_record_when_mlflow_had_everything(tmp_path):
    tracker = start_tracker(
        TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db"), "e", "x", None
    )
    tracker.log_params({"export.format": "merged"})
    folder = tmp_path / "export-merged"
    folder.mkdir()
    tracker.keep_record_in(folder, only_if_needed=True)
    tracker.log_metrics({"parity/max_abs_diff": 0.0}, step=None)
    tracker.end("FINISHED")
    assert list(folder.iterdir()) == []
    assert MlflowClient(f"sqlite:///{tmp_path}/m.db").get_run(tracker.run_id).info.status == (
        "FINISHED"
    )


def test_a_resume_with_mlflow_down_keeps_the_run_it_continues(tmp_path):
    (tmp_path / "tracking.json").write_text(json.dumps({"run_id": "abc123"}))
    tracker = start_tracker(DOWN, "demo", "run", tmp_path)
    tracker.log_metrics({"train/loss": 1.0}, step=5)
    assert json.loads((tmp_path / "tracking.json").read_text())["run_id"] == "abc123"
    _, run_id, _ = pending_events(tmp_path)
    assert run_id == "abc123"  # the import completes that run, not a new one


def test_registering_refuses_to_start_when_mlflow_is_down(tmp_path):
    with pytest.raises(LmmtuneError, match="export.register_name needs MLflow.*127.0.0.1:9"):
        start_tracker(DOWN, "exp", "x", None, "the export", "export.register_name needs MLflow")


def test_an_imported_eval_folder_is_cleared_whole_by_overwrite(tmp_path, capsys):
    """The import's state is listed in the folder's manifest: left behind by
    `eval.overwrite=true`, it would mark the next evaluation's calls as imported already."""
    path = tmp_path / "eval"
    with listed_when_done(claim_folder(path, "eval", False, "eval.output", "eval.overwrite")):
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
    pending, _, _ = pending_events(path)
    assert len(pending) == 2


def test_importing_a_run_takes_its_eval_and_export_folders_along(tmp_path, capsys):
    run = tmp_path / "run"
    with listed_when_done(claim_folder(run, "run", False, "output_dir", "overwrite")):
        start_tracker(DOWN, "demo", "run", run).end("FINISHED")
    for name, kind in (("eval", "eval"), ("export-merged", "export"), ("notes", None)):
        folder = run / name
        if kind:
            claim_folder(folder, kind, False, "x", "y")
        else:
            folder.mkdir()  # a user's folder: never imported
        tracker = start_tracker(DOWN, "demo", f"run-{name}", folder, "the evaluation")
        tracker.end("FINISHED")

    out = import_into(run, f"sqlite:///{tmp_path}/mlflow.db", capsys)
    assert out.count("imported 0 calls") == 3, out
    names = set(runs_of(f"sqlite:///{tmp_path}/mlflow.db", "demo"))
    assert names == {"run (imported)", "run-eval (imported)", "run-export-merged (imported)"}


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

    from lmmtune.owned import foreign_files
    from tests.conftest import run_cli

    shutil.copytree(demo_run["run_dir"], tmp_path / "run")  # eval/ and export-* of other tests
    for leftover in ("eval", "export-merged", "export-adapter"):
        shutil.rmtree(tmp_path / "run" / leftover, ignore_errors=True)
    down = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    evaluated = run_cli(["eval", "output_dir=run"], cwd=tmp_path, env=down)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "the evaluation goes on" in evaluated.stderr
    exported = run_cli(["export", "output_dir=run"], cwd=tmp_path, env=down)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "the export goes on" in exported.stderr
    for folder in (tmp_path / "run" / "eval", tmp_path / "run" / "export-merged"):
        listed = read_manifest(folder)["files"]
        assert {"tracking_record.jsonl", "tracking.json"} <= set(listed), folder
        assert foreign_files(folder) == []  # export.overwrite=true may replace it later

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
