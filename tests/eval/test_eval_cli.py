"""`python -m lmmtune eval` on the demo run reproduces its before/after numbers; both are tracked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

EXPERIMENT = "demo-eval"


@pytest.fixture(scope="module")
def eval_cli(demo_run):
    """One `eval output_dir=run` of the demo run, tracked in an experiment of its own
    (the demo experiment keeps its one training run)."""
    workdir = demo_run["workdir"]
    uri = demo_run["tracking_uri"]
    result = run_cli(["eval", "output_dir=run", f"tracking.experiment={EXPERIMENT}"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    out_dir = demo_run["run_dir"] / "eval"
    return {
        "dir": out_dir,
        "metrics": json.loads((out_dir / "metrics.json").read_text()),
        "uri": uri,
    }


def _predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_reproduces_the_training_runs_before_and_after(demo_run, eval_cli):
    trained = json.loads((demo_run["run_dir"] / "metrics.json").read_text())
    again = eval_cli["metrics"]
    for phase in ("eval_before", "eval_after"):
        for key in ("accuracy", "exact_match", "token_f1", "samples"):
            assert again[phase][key] == pytest.approx(trained[phase][key], abs=0.01), (phase, key)
    # the same answers, sample by sample
    during = _predictions(demo_run["run_dir"] / "eval_predictions.jsonl")
    after = _predictions(eval_cli["dir"] / "predictions.jsonl")
    assert [r["id"] for r in during] == [r["id"] for r in after]
    same = sum(
        a["after"] == b["after"] and a["before"] == b["before"]
        for a, b in zip(during, after, strict=True)
    )
    assert same >= 0.99 * len(during)


def test_training_metrics_keep_accuracy_and_add_the_vqa_metrics(demo_run):
    trained = json.loads((demo_run["run_dir"] / "metrics.json").read_text())
    after = trained["eval_after"]
    assert {"accuracy", "exact_match", "token_f1", "samples", "closed_samples"} <= set(after)
    assert after["closed_samples"] == after["samples"]  # the demo's questions are all closed
    assert after["by_type"]["closed"]["accuracy"] == after["accuracy"]
    rows = _predictions(demo_run["run_dir"] / "eval_predictions.jsonl")
    assert set(rows[0]) >= {"image", "question", "reference", "before", "after", "correct_after"}
    hits = sum(row["correct_after"] for row in rows)
    assert hits / len(rows) == pytest.approx(after["accuracy"])


def test_eval_writes_its_own_outputs_and_never_the_training_metrics(demo_run, eval_cli):
    top = {"metrics.json", "predictions.jsonl", "before_after.png"}
    top |= {"images"}  # small copies of the eval images: MLflow thumbnails, sample grid
    top |= {"tracking.json", "tracking_record.jsonl"}  # the MLflow run; what was sent to it
    assert {p.name for p in eval_cli["dir"].iterdir()} == top | {".lmmtune.json"}
    images = sorted(f"images/{p.name}" for p in (eval_cli["dir"] / "images").iterdir())
    assert images  # one copy per evaluated image
    manifest = json.loads((eval_cli["dir"] / ".lmmtune.json").read_text())
    written = sorted((top - {"images"}) | set(images))
    assert manifest == {"kind": "eval", "files": written}  # what eval.overwrite clears
    assert (eval_cli["dir"] / "before_after.png").read_bytes()[:4] == b"\x89PNG"
    assert eval_cli["metrics"]["adapter"].endswith("adapter")


def _runs(uri: str, experiment: str = "demo"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_eval_is_tracked_with_table_and_chart(eval_cli):
    client, runs = _runs(eval_cli["uri"], EXPERIMENT)
    (run,) = [r for r in runs if r.data.tags.get("command") == "eval"]
    assert run.info.status == "FINISHED"
    assert float(run.data.tags["eval_after/accuracy"]) == pytest.approx(
        eval_cli["metrics"]["eval_after"]["accuracy"]
    )
    assert "eval_before/by_type.closed.accuracy" in run.data.tags
    assert not [key for key in run.data.metrics if key.startswith("eval_")]  # no one-bar charts
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/predictions.json", "eval/before_after.png", "eval/metrics.json"} <= files
    local = client.download_artifacts(run.info.run_id, "eval/predictions.json")
    table = json.loads(Path(local).read_text())
    assert {"image", "question", "reference", "before", "after", "correct_after"} <= set(
        table["columns"]
    )
    image = table["data"][0][table["columns"].index("image")]
    assert image["type"] == "image"  # thumbnails, shown as images in the MLflow UI


def test_training_run_logs_the_predictions_table_and_chart(demo_run):
    client, runs = _runs(demo_run["tracking_uri"])
    (run,) = runs  # the training run
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/predictions.json", "eval/eval_before_after.png"} <= files
    assert "eval_after/exact_match" in run.data.tags


def test_eval_refuses_to_replace_an_evaluation_and_needs_an_adapter(demo_run, eval_cli, tmp_path):
    from lmmtune.errors import LmmtuneError
    from lmmtune.eval.run import run_eval
    from tests.conftest import compose_config

    again = compose_config([f"output_dir={demo_run['run_dir']}", "tracking=none"])
    empty = compose_config([f"output_dir={tmp_path}", "tracking=none"])
    with pytest.raises(LmmtuneError, match="already holds an evaluation.*eval.overwrite=true"):
        run_eval(again, overrides=[])
    with pytest.raises(LmmtuneError, match="no adapter in .*adapter_config.json missing"):
        run_eval(empty, overrides=[])


def test_a_failed_eval_leaves_no_folder_that_refuses_the_corrected_one(tmp_path):
    from lmmtune.rundir.folders import check_claim
    from tests.test_rundir import make_run

    run = make_run(tmp_path / "run")

    failed = run_cli(
        ["eval", f"output_dir={run.root}", "eval.data=/nonexistent.json", "tracking=none"],
        cwd=tmp_path,
    )

    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "/nonexistent.json" in failed.stderr
    assert not run.eval.exists()
    check_claim(run.eval, "eval", False, "eval.output", "eval.overwrite")  # the next is welcome
