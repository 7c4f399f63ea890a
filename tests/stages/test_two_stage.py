"""Both stages in one command (recipe=demo_two_stage): each stage's config from the one
config, both validated at composition, `check` of both stages' data, the two-stage run
folder, the parent MLflow run with a child per stage, and a kill -9 in either stage resumed
with train.resume=auto."""

from __future__ import annotations

import json
import logging

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import lmmtune
from lmmtune.commands import check
from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.rundir.run import open_run_dir, record_run_files
from lmmtune.rundir.two_stage import TWO_STAGE_KIND, two_stage_folder
from lmmtune.stage_configs import stage_configs
from lmmtune.tracking.parent import children_of, parent_run_in
from lmmtune.tracking.tracker import start_tracker
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli
from tests.test_reliability import FAST, kill_9_at_checkpoint

TWO_STAGE = ["recipe=demo_two_stage", "output_dir=out"]


def test_one_config_gives_stage_1_its_differences_and_stage_2_the_rest():
    cfg = compose_config([*TWO_STAGE, "two_stage.align.train.learning_rate=5e-3"])
    cfg_plus = compose_config([*TWO_STAGE, "+two_stage.align.train.max_steps=3"])
    stages, added = stage_configs(cfg), stage_configs(cfg_plus)

    align, instruct = stages.align, stages.instruct
    assert (align.output_dir, instruct.output_dir) == ("out/align", "out/instruct")
    assert align.data.train == "demo_captions" and align.data.group_by_image is False
    assert (align.stage, align.data.template, instruct.stage) == ("align", "plain", "sft")
    assert align.train.learning_rate == 5e-3 and align.train.epochs == 4  # demo_align's
    assert instruct.train.learning_rate == 2e-3 and instruct.train.epochs == 8  # recipe=demo's
    assert (align.tracking.run_name, instruct.tracking.run_name) == ("align", "instruct")
    for stage in (align, instruct):  # plain one-stage configs: they validate and run as such
        assert not stage.two_stage.enabled and stage.data.captions is None
        validate(stage)
    assert added.align.train.max_steps == 3 and added.instruct.train.max_steps == -1


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+two_stage.align.train.learnin_rate=1", "two_stage.align.train.learnin_rate:"),
        ("+two_stage.align.output_dir=elsewhere", "two_stage.align.output_dir: not a stage-1"),
        ("+two_stage.align.model.path=other", "two_stage.align.model.path: not a stage-1"),
        ("+two_stage.align.quant.mode=3bit", "two_stage.align.quant.mode: Invalid value"),
        ("two_stage.align.train.optim=adamw_torh", "stage 1 (align): train.optim=adamw_torh"),
        ("data.captions=null", "data.captions=null: a two-stage run"),
        ("train.resume=out/checkpoints/checkpoint-3", "resumes with train.resume=auto"),
        ("dpo.from_base=true dpo.enabled=true", "dpo.enabled=true: stage 2 of a two-stage"),
        (
            "stage=align peft.train_lm_head=false peft.projector_lr=null",
            "stage=align: stage 2 of a two-stage",
        ),
    ],
)
def test_a_setting_either_stage_cannot_run_with_is_refused_at_composition(override, named):
    with pytest.raises(LmmtuneError, match="invalid settings") as refused:
        validate(compose_config([*TWO_STAGE, *override.split()]))
    assert named in str(refused.value)


def test_captions_without_a_two_stage_run_are_refused():
    with pytest.raises(LmmtuneError, match="data.captions is stage 1's data"):
        validate(compose_config(["recipe=demo", "data.captions=demo"]))


def test_a_bad_stage_1_setting_refuses_the_run_before_anything_is_written(tmp_path):
    result = run_cli([*TWO_STAGE, "two_stage.align.train.learning_rate=-1"], cwd=tmp_path)
    assert result.returncode == 1
    assert "stage 1 (align): train.learning_rate=-1.0: must be > 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def write_captions(folder, missing_image: bool):
    """Two caption records in LLaVA's pretrain layout; one image missing if asked."""
    folder.mkdir()
    Image.new("RGB", (32, 32), "gray").save(folder / "scan.png")
    records = [
        {"id": f"c{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the scan."},
            {"from": "gpt", "value": "a gray scan"},
        ]}
        for i, image in enumerate(["scan.png", "gone.png" if missing_image else "scan.png"])
    ]  # fmt: skip
    (folder / "captions.json").write_text(json.dumps(records))
    return folder / "captions.json"


def test_check_reports_both_stages_and_names_the_one_that_fails(tmp_path, capsys):
    captions = write_captions(tmp_path / "captions", missing_image=True)
    cfg = compose_config([*TWO_STAGE, f"data.captions={captions}", "data.eval_fraction=0"])
    validate(cfg, "check")
    with pytest.raises(LmmtuneError) as refused:
        check(cfg)
    printed = capsys.readouterr().out
    assert f"== stage 1 (align): data.train={captions}" in printed
    assert "== stage 2 (instruct): data.train=demo" in printed  # checked all the same
    assert "gone.png" in printed
    assert str(refused.value).startswith("stage 1 (align): 1 invalid record(s) of 2")
    assert "stage 2" not in str(refused.value)

    good = write_captions(tmp_path / "good", missing_image=False)
    reports = check(compose_config([*TWO_STAGE, f"data.captions={good}", "data.eval_fraction=0"]))
    assert len(reports["align"].train) == 2 and reports["instruct"].train


def test_bad_stage_2_data_refuses_the_run_before_stage_1_trains(tmp_path, caplog):
    vqa = write_captions(tmp_path / "vqa", missing_image=True)  # one image missing
    out = tmp_path / "out"
    args = [*TWO_STAGE, f"output_dir={out}", f"data.train={vqa}", "data.eval_fraction=0"]
    caplog.set_level(logging.INFO)
    with pytest.raises(LmmtuneError, match=r"1 invalid record\(s\)") as refused:
        lmmtune.finetune(compose_config([*args, "tracking=none"]))
    assert "gone.png" in str(refused.value) + caplog.text
    assert "checking stage 2's data" in caplog.text and "stage 1 of 2" not in caplog.text
    assert not out.exists()  # nothing left that would refuse the fixed command


def two_stage_run(out, with_user_file=False):
    """A two-stage folder as a run leaves it: its own files, and both stages' runs."""
    with two_stage_folder(out, overwrite=False, resume=None) as folder:
        folder.config.write_text("name: x\n")
    for stage in ("align", "instruct"):
        open_run_dir(out / stage)
        (out / stage / "metrics.json").write_text("{}")
        record_run_files(out / stage)
    if with_user_file:
        (out / "align" / "notes.txt").write_text("mine")


def test_the_two_stage_folder_is_never_reused_by_accident(tmp_path):
    out = tmp_path / "out"
    two_stage_run(out, with_user_file=True)
    assert json.loads((out / ".lmmtune.json").read_text())["kind"] == TWO_STAGE_KIND

    with pytest.raises(LmmtuneError, match="already holds a two-stage run. Continue it with"):
        two_stage_folder(out, overwrite=False, resume=None).__enter__()
    with pytest.raises(LmmtuneError, match="holds a finished two-stage run"):
        two_stage_folder(out, overwrite=False, resume="auto").__enter__()
    with two_stage_folder(out, overwrite=True, resume=None):
        pass  # overwrite=true: what lmmtune wrote goes, the user's file stays
    assert not (out / "align" / "metrics.json").exists() and not (out / "config.yaml").exists()
    assert (out / "align" / "notes.txt").read_text() == "mine"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("keep")
    with pytest.raises(LmmtuneError, match="holds files and was not made by lmmtune"):
        two_stage_folder(foreign, overwrite=True, resume=None).__enter__()
    assert (foreign / "data.csv").read_text() == "keep"


def test_a_fresh_folder_that_failed_before_either_stage_is_removed(tmp_path):
    out = tmp_path / "out"
    failing = pytest.raises(LmmtuneError, match="stage 1 failed")
    with failing, two_stage_folder(out, overwrite=False, resume=None):
        raise LmmtuneError("stage 1 failed")
    assert not out.exists()


def test_the_parent_run_is_reopened_on_a_resume_and_its_stages_are_children(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "out"
    out.mkdir()
    stage_runs = {}
    for attempt, stage in enumerate(("align", "instruct")):  # a resume between the stages
        with parent_run_in(out, tracking, "two", "out", {"recipe": "two"}) as parent_run_id:
            tags = {"lmmtune.stage": stage}
            tags |= {"lmmtune.stage1_run_id": stage_runs["align"]} if attempt else {}
            (out / stage).mkdir()
            with children_of(parent_run_id, tags):
                tracker = start_tracker(tracking, "two", stage, out / stage)
                tracker.end("FINISHED")
            stage_runs[stage] = tracker.run_id

    client = MlflowClient(tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("two").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # not duplicated
    assert parent.info.status == "FINISHED" and parent.info.run_name == "out"
    assert json.loads((out / "tracking.json").read_text())["run_id"] == parent.info.run_id
    children = {r.info.run_name: r.data.tags for r in runs if r is not parent}
    assert sorted(children) == ["align", "instruct"]
    for stage, tags in children.items():
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["lmmtune.stage"] == stage
    assert children["instruct"]["lmmtune.stage1_run_id"] == stage_runs["align"]


# Both stages on the small demo set (50 training records, batch 4): 8 steps each,
# a checkpoint every 2.
KILLED_STAGES = [a for a in FAST if not a.startswith("recipe=")]
KILLED_STAGES += [*TWO_STAGE, "train.max_steps=8", "train.save_steps=2"]


@pytest.mark.slow  # three processes of a tiny two-stage run (~2 min on 2 cores): CI's slow step
def test_a_kill_9_in_either_stage_resumes_in_that_stage(tmp_path):
    out = tmp_path / "out"
    kill_9_at_checkpoint(KILLED_STAGES, tmp_path, out / "align", min_step=2)  # in stage 1
    assert not (out / "instruct").exists()
    parent_run_id = json.loads((out / "tracking.json").read_text())["run_id"]

    resumed = [*KILLED_STAGES, "train.resume=auto"]
    in_stage_2, log = kill_9_at_checkpoint(resumed, tmp_path, out / "instruct", min_step=4)
    assert f"resuming from {out.name}/align/checkpoints/checkpoint-" in log  # stage 1 went on
    stage_1 = json.loads((out / "align" / "metrics.json").read_text())  # finished, then killed
    assert stage_1["train"]["steps"] == 8

    result = run_cli(resumed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1 (align) finished in" in result.stderr and "not redone" in result.stderr
    assert f"resuming from {out.name}/instruct/checkpoints/{in_stage_2.name}" in result.stderr
    assert json.loads((out / "align" / "metrics.json").read_text()) == stage_1
    assert json.loads((out / "instruct" / "metrics.json").read_text())["train"]["steps"] == 8

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo_two_stage").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_id == parent_run_id and parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(children) == ["align", "instruct"]  # each stage one run, continued
    align_id = json.loads((out / "align" / "tracking.json").read_text())["run_id"]
    assert children["instruct"].data.tags["lmmtune.stage1_run_id"] == align_id
    assert all(child.info.status == "FINISHED" for child in children.values())
