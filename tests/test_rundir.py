"""Nothing a user owns is deleted: overwrite clears only folders lmmtune made, only its files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.folders import MANIFEST, read_manifest
from lmmtune.rundir.run import RunDir, prepare_run_dir, record_run_files, release_lock
from tests.conftest import compose_config, run_cli


def make_run(run_dir: Path, finished: bool = True) -> RunDir:
    """A run directory as `train` leaves it (manifest, config, adapter, a checkpoint, metrics)."""
    from lmmtune.rundir.run import save_config

    prepare_run_dir(run_dir, overwrite=False, resume=None)
    run = RunDir(run_dir)
    save_config(compose_config(["recipe=demo"]), run_dir)
    run.adapter.mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    (run.adapter / "adapter_model.safetensors").write_text("weights")
    (run.checkpoints / "checkpoint-4").mkdir(parents=True)
    (run.checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")
    if finished:
        run.metrics.write_text("{}")
    record_run_files(run_dir)
    release_lock(run_dir)
    return run


def test_overwrite_of_a_run_deletes_only_what_lmmtune_wrote(tmp_path):
    run = make_run(tmp_path / "run")
    (run.adapter / "my_notes.txt").write_text("mine")  # the user's files under lmmtune's names
    (run.checkpoints / "mine.bin").write_text("mine")
    run.eval.mkdir()
    (run.eval / "my_eval.csv").write_text("mine")
    (run.root / "export-merged").mkdir()
    (run.root / "export-merged" / "model.bin").write_text("mine")

    assert prepare_run_dir(run.root, overwrite=True, resume=None) is None

    assert not run.config.exists() and not run.metrics.exists()
    assert not (run.adapter / "adapter_model.safetensors").exists()
    assert not (run.checkpoints / "checkpoint-4").exists()
    for kept in ("adapter/my_notes.txt", "checkpoints/mine.bin", "eval/my_eval.csv"):
        assert (run.root / kept).read_text() == "mine"
    assert (run.root / "export-merged" / "model.bin").read_text() == "mine"


@pytest.mark.parametrize("options", [{}, {"overwrite": True}, {"resume": "auto"}])
def test_a_non_empty_folder_that_is_not_a_run_is_refused(tmp_path, options):
    (tmp_path / "metrics.json").write_text("the user's metrics")
    (tmp_path / "data_report.txt").write_text("the user's report")
    with pytest.raises(LmmtuneError, match="not an lmmtune run"):
        prepare_run_dir(
            tmp_path, overwrite=options.get("overwrite", False), resume=options.get("resume")
        )
    assert (tmp_path / "metrics.json").read_text() == "the user's metrics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_report.txt", "metrics.json"]


def test_an_empty_folder_becomes_a_run(tmp_path):
    assert prepare_run_dir(tmp_path, overwrite=False, resume=None) is None
    assert read_manifest(tmp_path)["kind"] == "run"


def test_resume_of_a_finished_run_is_refused_unless_overwrite(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(LmmtuneError, match="finished run.*new output_dir.*overwrite=true"):
        prepare_run_dir(run.root, overwrite=False, resume="auto")
    assert (run.adapter / "adapter_model.safetensors").read_text() == "weights"
    # overwrite=true replaces it: no checkpoint of the old run to continue from
    assert prepare_run_dir(run.root, overwrite=True, resume="auto") is None
    assert not run.adapter.exists()


def test_resume_of_an_unfinished_run_continues_from_its_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", finished=False)
    assert prepare_run_dir(run.root, overwrite=False, resume="auto") == (
        run.checkpoints / "checkpoint-4"
    )


@pytest.mark.parametrize("options", [(True, None), (False, "auto"), (False, None)])
def test_a_run_like_folder_without_a_manifest_is_not_lmmtunes(tmp_path, options):
    """A config.yaml and an adapter under lmmtune's names: neither cleared, resumed nor used."""
    (tmp_path / "config.yaml").write_text("name: old\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("weights")
    with pytest.raises(LmmtuneError, match="is not an lmmtune run"):
        prepare_run_dir(tmp_path, *options)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "weights"
    assert not (tmp_path / MANIFEST).exists()


@pytest.mark.parametrize("where", ["run", "parent", "user"])
def test_eval_overwrite_never_clears_a_run_its_parent_or_a_user_folder(tmp_path, where):
    from lmmtune.eval.run import prepare_output_dir

    run = make_run(tmp_path / "runs" / "run")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    target = {"run": run.root, "parent": tmp_path / "runs", "user": user}[where]
    with pytest.raises(LmmtuneError, match="never writes into or clears it"):
        prepare_output_dir(target, overwrite=True)
    assert (run.adapter / "adapter_model.safetensors").read_text() == "weights"
    assert (user / "notes.txt").read_text() == "mine"


def test_eval_overwrite_clears_only_the_files_an_earlier_eval_wrote(tmp_path):
    from lmmtune.eval.run import prepare_output_dir

    folder = prepare_output_dir(tmp_path / "eval", overwrite=False)
    (folder.path / "metrics.json").write_text("{}")
    folder.record()
    (folder.path / "my_analysis.txt").write_text("mine")  # added by the user afterwards
    with pytest.raises(LmmtuneError, match="eval.overwrite=true"):
        prepare_output_dir(tmp_path / "eval", overwrite=False)
    prepare_output_dir(tmp_path / "eval", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [MANIFEST, "my_analysis.txt"]


def test_eval_cli_into_the_run_folder_with_overwrite_keeps_the_run(tmp_path):
    run = make_run(tmp_path / "run")
    before = sorted(str(p) for p in run.root.rglob("*"))
    result = run_cli(
        ["eval", f"output_dir={run.root}", f"eval.output={run.root}", "eval.overwrite=true"],
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "never writes into or clears it" in result.stderr and "Traceback" not in result.stderr
    assert sorted(str(p) for p in run.root.rglob("*")) == before


@pytest.mark.parametrize("where", ["user", "foreign_file"])
def test_export_overwrite_never_replaces_a_user_folder(tmp_path, where):
    from lmmtune.export.run import check_target, mark_export

    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")
    if where == "foreign_file":
        mark_export(target)
        (target / "my_readme.md").write_text("mine")
    message = "not made by lmmtune export" if where == "user" else "my_readme.md"
    with pytest.raises(LmmtuneError, match=message):
        check_target(target, overwrite=True, protected=[tmp_path / "run"])


def test_export_overwrite_replaces_an_earlier_export(tmp_path):
    from lmmtune.export.run import check_target, mark_export

    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")
    mark_export(target)
    with pytest.raises(LmmtuneError, match="export.overwrite=true"):
        check_target(target, overwrite=False, protected=[])
    check_target(target, overwrite=True, protected=[])


def test_staging_left_by_a_killed_export_is_removed_by_the_next(tmp_path):
    from lmmtune.rundir.files import staged_directory

    target = tmp_path / "export-merged"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    with pytest.raises(RuntimeError), staged_directory(target, False, marked=True) as tmp:
        stale = tmp.with_name(f".export-merged.tmp-{dead}")
        tmp.rename(stale)  # what a process killed mid-export leaves behind
        tmp.mkdir()
        raise RuntimeError("killed")
    assert stale.is_dir()
    alive = tmp_path / f".export-merged.tmp-{os.getppid()}"  # a running export's: kept
    alive.mkdir()
    (alive / ".lmmtune-staging").write_text("")
    user = tmp_path / ".export-merged.tmp-1x"
    user.mkdir()
    with staged_directory(target, replace=False, marked=True) as tmp:
        (tmp / "model.safetensors").write_text("w")
    assert not stale.exists() and alive.exists() and user.exists()
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(("limit", "kept"), [(-1, [4, 8, 12]), (0, [4, 8, 12]), (2, [8, 12])])
def test_checkpoint_rotation_never_deletes_what_it_should_keep(tmp_path, limit, kept):
    from lmmtune.rundir.run import completed_checkpoints, keep_last

    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    keep_last(tmp_path, limit)
    assert [int(p.name.split("-")[1]) for p in completed_checkpoints(tmp_path)] == kept
