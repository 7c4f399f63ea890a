"""Manifests and overwrite=true, tried as a hostile user would: a run folder someone sends may
hold any manifest and any links, and clearing it must never reach a file outside it."""

from __future__ import annotations

import json

import pytest

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.folders import MANIFEST
from lmmtune.rundir.run import prepare_run_dir
from tests.test_rundir import make_run


def tamper(folder, files) -> None:
    """Rewrite `folder`'s manifest file list as a crafted run folder would have it."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = files
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry", ["../victim.txt", "ABSOLUTE", "adapter/../../victim.txt"])
def test_a_manifest_entry_outside_the_folder_is_refused_and_nothing_is_deleted(tmp_path, entry):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    run = make_run(tmp_path / "run")
    entry = str(victim) if entry == "ABSOLUTE" else entry
    tamper(run.root, ["config.yaml", entry])
    with pytest.raises(LmmtuneError, match=f"{MANIFEST}.*not a valid lmmtune manifest"):
        prepare_run_dir(run.root, overwrite=True, resume=None)
    assert victim.read_text() == "the user's"
    assert run.config.is_file()  # refused before anything was cleared


def test_a_link_in_the_run_is_never_entered_by_overwrite(tmp_path):
    mine = tmp_path / "my_adapter"
    mine.mkdir()
    (mine / "adapter_model.safetensors").write_text("the user's weights")
    run = make_run(tmp_path / "run")
    (run.adapter / "adapter_model.safetensors").unlink()
    (run.adapter / "adapter_config.json").unlink()
    run.adapter.rmdir()
    run.adapter.symlink_to(mine, target_is_directory=True)  # RUN/adapter -> the user's folder
    with pytest.raises(LmmtuneError, match="is a link"):
        prepare_run_dir(run.root, overwrite=True, resume=None)
    assert (mine / "adapter_model.safetensors").read_text() == "the user's weights"
    assert run.config.is_file()


def test_overwrite_never_clears_another_run_kept_inside_the_run(tmp_path):
    run = make_run(tmp_path / "run")
    backup = make_run(run.root / "previous_run_backup")  # a copy with its own manifest
    kept = sorted(str(p) for p in backup.root.rglob("*"))
    prepare_run_dir(run.root, overwrite=True, resume=None)
    assert not run.config.exists() and not run.adapter.exists()
    assert sorted(str(p) for p in backup.root.rglob("*")) == kept
    assert (backup.adapter / "adapter_model.safetensors").read_text() == "weights"


def test_a_folder_claimed_by_a_command_that_fails_is_removed_again(tmp_path):
    from lmmtune.rundir.folders import claim_folder, claimed_for_this_command

    user_empty = tmp_path / "empty"
    user_empty.mkdir()
    for path in (tmp_path / "new", user_empty):
        with (
            pytest.raises(RuntimeError),
            claimed_for_this_command(
                claim_folder, path, "eval", False, "eval.output", "eval.overwrite"
            ) as folder,
        ):
            (folder.path / "tracking_record.jsonl").write_text("{}")
            folder.record()
            raise RuntimeError("the evaluation failed")
    assert not (tmp_path / "new").exists()
    assert user_empty.is_dir() and list(user_empty.iterdir()) == []


def test_the_refusal_of_a_user_folder_reads_as_a_sentence(tmp_path):
    from lmmtune.rundir.folders import claim_folder

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LmmtuneError) as refused:
        claim_folder(tmp_path, "eval", True, "eval.output", "eval.overwrite")
    assert str(refused.value).startswith(
        f"{tmp_path} holds files and was not made by lmmtune: lmmtune never writes into"
    )


@pytest.mark.parametrize("shape", ["folder", "fifo", "link", "deep", "huge"])
def test_a_manifest_that_is_no_plain_small_json_file_is_refused_without_hanging(tmp_path, shape):
    import os

    from lmmtune.rundir.folders import MAX_MANIFEST_BYTES

    run = make_run(tmp_path / "run")
    manifest = run.root / MANIFEST
    manifest.unlink()
    if shape == "folder":
        manifest.mkdir()
    elif shape == "fifo":
        os.mkfifo(manifest)  # reading it would block forever
    elif shape == "link":
        (tmp_path / "other.json").write_text(json.dumps({"kind": "run", "files": []}))
        manifest.symlink_to(tmp_path / "other.json")
    elif shape == "deep":
        manifest.write_text("[" * 100_000 + "]" * 100_000)
    else:
        manifest.write_text(" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(LmmtuneError, match="not a valid lmmtune manifest"):
        prepare_run_dir(run.root, overwrite=True, resume=None)
    assert run.config.is_file()


def test_a_planted_temporary_link_is_never_written_through(tmp_path):
    """`write_text_atomic` writes `.NAME.tmp-PID` first: a link planted under that name in a
    folder someone else made must not lead the write to a file of the user's."""
    import os

    from lmmtune.rundir.files import write_text_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / f".out.json.tmp-{os.getpid()}").symlink_to(victim)
    write_text_atomic(folder / "out.json", "{}")
    assert victim.read_text() == "the user's" and (folder / "out.json").read_text() == "{}"


def test_the_run_lock_is_never_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    run = make_run(tmp_path / "run", finished=False)  # a run to resume
    (run.root / ".lmmtune.lock").unlink(missing_ok=True)
    (run.root / ".lmmtune.lock").symlink_to(victim)
    with pytest.raises(LmmtuneError, match="is a link"):
        prepare_run_dir(run.root, overwrite=False, resume="auto")
    assert victim.read_text() == "the user's"


def test_overwrite_clears_the_runs_own_eval_and_export_folders(tmp_path):
    from lmmtune.export.run import mark_export
    from lmmtune.rundir.folders import adopt, claim_folder

    run = make_run(tmp_path / "run")
    evaluation = claim_folder(run.eval, "eval", False, "eval.output", "eval.overwrite")
    (run.eval / "metrics.json").write_text("{}")
    evaluation.record()
    export = run.root / "export-merged"
    export.mkdir()
    (export / "model.safetensors").write_text("w")
    mark_export(export)
    adopt(export)
    assert json.loads((run.root / MANIFEST).read_text())["folders"] == ["eval", "export-merged"]

    prepare_run_dir(run.root, overwrite=True, resume=None)

    assert not run.eval.exists() and not export.exists()
