"""`import` tried as a hostile user would: a record someone sends names the calls and the files
to upload. Only the calls lmmtune records are replayed, only files inside the record's own
folder are uploaded, and a record that breaks either rule is refused naming its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmmtune.tracking.tracker import start_tracker
from tests.tracking.test_fault_policy import DOWN, import_into, runs_of


def recorded_eval(folder: Path) -> Path:
    """An evaluation folder whose MLflow was down: a record of 3 calls, then the crafted ones."""
    tracker = start_tracker(DOWN, "exp", "run-eval", folder, "the evaluation")
    (folder / "metrics.json").write_text('{"accuracy": 0.5}')
    tracker.log_metrics({"eval/accuracy": 0.5}, step=None)
    tracker.log_artifact(folder / "metrics.json", "eval")
    tracker.end("FINISHED")
    return folder / "tracking_record.jsonl"


def append(record: Path, method: str, args: list, kwargs: dict | None = None) -> int:
    """Add a crafted call to the record; its line number."""
    event = {"time": 0, "method": method, "args": args, "kwargs": kwargs or {}}
    with record.open("a") as out:
        out.write(json.dumps({**event, "delivered": False, "run_id": None}) + "\n")
    return len(record.read_text().splitlines())


def refused(folder: Path, uri: str, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        import_into(folder, uri, capsys)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def nothing_in(uri: str) -> bool:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    return experiment is None or not client.search_runs([experiment.experiment_id])


@pytest.mark.parametrize(
    "call",
    ["passwd", "user_folder", "user_model", "link_out", "table_image", "artifact_path"],
)
def test_a_record_naming_files_outside_its_folder_uploads_nothing(tmp_path, capsys, call):
    folder = tmp_path / "eval"
    record = recorded_eval(folder)
    user = tmp_path / "my_notes"
    user.mkdir()
    (user / "diary.txt").write_text("private")
    (folder / "innocent.txt").symlink_to(user / "diary.txt")
    method, args, kwargs = {
        "passwd": ("log_artifact", ["/etc/passwd"], {}),
        "user_folder": ("log_artifact", [str(user)], {"artifact_path": "x"}),
        "user_model": ("log_model", [str(user)], {}),
        "link_out": ("log_artifact", [str(folder / "innocent.txt")], {}),
        "table_image": ("log_table", [[{"image": str(user / "diary.txt")}], "t.json", "image"], {}),
        "artifact_path": ("log_artifact", [str(folder / "metrics.json"), "../../../x"], {}),
    }[call]
    line = append(record, method, args, kwargs)
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    err = refused(folder, uri, capsys)

    assert f"{record}:{line}: {method}" in err and "nothing of it was imported" in err
    assert nothing_in(uri)


@pytest.mark.parametrize("method", ["forget", "__init__", "log_system_metrics", "mlflow"])
def test_a_record_calling_anything_but_lmmtunes_calls_is_refused(tmp_path, capsys, method):
    folder = tmp_path / "eval"
    record = recorded_eval(folder)
    line = append(record, method, [])
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    err = refused(folder, uri, capsys)

    assert f"{record}:{line}: '{method}' is not a call lmmtune records" in err
    assert nothing_in(uri)


def test_a_record_line_that_is_no_json_is_named_not_blamed_on_mlflow(tmp_path, capsys):
    folder = tmp_path / "eval"
    record = recorded_eval(folder)
    with record.open("a") as out:
        out.write('{"method": "log_metrics", "args": [{"a": 1')  # cut short by a kill
    err = refused(folder, f"sqlite:///{tmp_path}/mlflow.db", capsys)
    assert f"{record}:4: not a JSON line" in err and "MLflow" not in err


def test_each_tracking_store_gets_the_whole_record_once(tmp_path, capsys):
    folder = tmp_path / "eval"
    recorded_eval(folder)
    first, second = f"sqlite:///{tmp_path}/first.db", f"sqlite:///{tmp_path}/second.db"

    assert "imported 2 calls" in import_into(folder, first, capsys)
    assert "imported 2 calls" in import_into(folder, second, capsys)
    assert "nothing to import" in import_into(folder, first, capsys)
    assert "nothing to import" in import_into(folder, second, capsys)

    for uri in (first, second):
        (run,) = runs_of(uri, "exp").values()
        assert run.data.metrics == {"eval/accuracy": 0.5} and run.info.status == "FINISHED"


def test_an_empty_record_says_so(tmp_path, capsys):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "tracking_record.jsonl").write_text("")
    out = import_into(folder, f"sqlite:///{tmp_path}/mlflow.db", capsys)
    assert out.strip() == f"nothing to import: the record of {folder} holds no calls"


def test_a_record_mlflow_got_whole_is_copied_whole_into_another_store(tmp_path, capsys):
    from lmmtune.config import TrackingConfig

    folder, original = tmp_path / "eval", f"sqlite:///{tmp_path}/original.db"
    tracker = start_tracker(TrackingConfig(tracking_uri=original), "exp", "run-eval", folder)
    tracker.log_metrics({"eval/accuracy": 0.75}, step=None)
    tracker.end("FINISHED")
    other = f"sqlite:///{tmp_path}/other.db"

    assert "nothing to import" in import_into(folder, original, capsys)
    assert "imported 1 calls" in import_into(folder, other, capsys)
    (copy,) = runs_of(other, "exp").values()
    assert copy.data.metrics == {"eval/accuracy": 0.75} and copy.info.run_id != tracker.run_id


def test_a_folder_inside_that_holds_a_link_out_is_not_uploaded(tmp_path, capsys):
    """An upload copies what a link points to: a folder of the record's own may not hold a
    link that leads out (the adapter folder with a link to the user's keys)."""
    folder = tmp_path / "eval"
    record = recorded_eval(folder)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id_ed25519").write_text("SECRET")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "adapter" / "keys").symlink_to(tmp_path / "keys")
    line = append(record, "log_artifact", [str(folder / "adapter")])
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    err = refused(folder, uri, capsys)

    assert f"{record}:{line}: log_artifact names" in err and "holds a link" in err
    assert nothing_in(uri)
    assert not [p for p in tmp_path.rglob("id_ed25519") if "keys" not in p.parts]


def test_the_allow_list_is_what_a_tracker_records(tmp_path):
    """Every public call of a Tracker writes a line the import accepts, and the import
    accepts no other call."""
    from lmmtune.tracking.importing import FILE_ARGUMENTS, checked_events
    from lmmtune.tracking.tracker import Tracker

    folder = tmp_path / "eval"
    sample_args = {
        "log_params": ({"train.lr": 0.1},),
        "log_metrics": ({"eval/accuracy": 0.5}, 3),
        "set_tags": ({"command": "eval"},),
        "log_artifact": (folder / "metrics.json", "eval"),
        "log_table": ([{"question": "q"}], "eval/predictions.json"),
        "log_dict": ({"a": 1}, "eval/numbers.json"),
        "log_dataset": ("eval", "data.jsonl", "abc123", "evaluation", 3),
        "log_model": (folder / "model", "demo-model"),
        "log_adapter_model": (folder / "adapter",),
        "end": ("FINISHED",),
    }
    public = [name for name, attr in vars(Tracker).items() if callable(attr) and name[0] != "_"]
    calls = [name for name in public if name != "start_run"]
    tracker = start_tracker(DOWN, "exp", "run-eval", folder, "the evaluation")
    for name in calls:
        getattr(tracker, name)(*sample_args[name])  # a new call: give it arguments above

    assert [event["method"] for event in checked_events(folder)] == calls
    assert set(FILE_ARGUMENTS) == set(calls)
