"""A resume is the same run: changed settings or data, a second train, damaged state: refused."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.resume import check_resume, save_data_digest
from lmmtune.rundir.run import RunDir, prepare_run_dir, record_run_files, release_lock, save_config
from tests.conftest import REPO_ROOT, compose_config, run_cli


def started_run(tmp_path, overrides=()):
    """A run killed after its first checkpoint: config, data digest, checkpoint, no metrics."""
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text('{"image": null, "question": "q", "answer": "a"}\n')
    cfg = compose_config(["recipe=demo", f"output_dir={tmp_path / 'run'}", *overrides])
    run = RunDir(tmp_path / "run")
    prepare_run_dir(run.root, overwrite=False, resume=None)
    save_config(cfg, run.root)
    save_data_digest(cfg, run.data_digest)
    (run.checkpoints / "checkpoint-4").mkdir(parents=True)
    (run.checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")
    record_run_files(run.root)
    release_lock(run.root)
    return run, cfg


def test_resume_with_changed_hyperparameters_lists_the_differences(tmp_path):
    run, _ = started_run(tmp_path)
    changed = compose_config(
        ["recipe=demo", f"output_dir={run.root}", "train.resume=auto", "peft.r=8"]
        + ["train.learning_rate=0.1"]
    )
    with pytest.raises(LmmtuneError) as error:
        check_resume(changed, run.config, run.data_digest)
    assert "peft.r: 16 -> 8" in str(error.value)
    assert "train.learning_rate: 0.002 -> 0.1" in str(error.value)


def test_resume_may_change_where_it_logs_and_how_often_it_saves(tmp_path):
    run, _ = started_run(tmp_path)
    same = compose_config(
        [
            "recipe=demo",
            f"output_dir={run.root}",
            "train.resume=auto",
            "train.save_steps=7",
            "tracking.experiment=elsewhere",
            "data.num_workers=1",
        ]
    )
    check_resume(same, run.config, run.data_digest)


def test_resume_with_changed_data_content_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": null, "question": "q", "answer": "a"}\n')
    overrides = [f"data.train={data}"]
    run, cfg = started_run(tmp_path, overrides)
    check_resume(cfg, run.config, run.data_digest)  # unchanged: fine
    data.write_text('{"image": null, "question": "q", "answer": "b"}\n')
    with pytest.raises(LmmtuneError, match="data.train content changed"):
        check_resume(cfg, run.config, run.data_digest)


def test_resume_cli_with_a_changed_rank_is_refused_before_any_work(tmp_path):
    run, _ = started_run(tmp_path)
    saved = run.config.read_text()
    result = run_cli(
        ["recipe=demo", f"output_dir={run.root}", "train.resume=auto", "peft.r=8"], cwd=tmp_path
    )
    assert result.returncode != 0
    assert "peft.r: 16 -> 8" in result.stderr and "Traceback" not in result.stderr
    assert run.config.read_text() == saved  # config.yaml not rewritten


def test_a_second_train_on_a_run_in_use_is_refused_naming_the_first(tmp_path):
    run, _ = started_run(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lmmtune.rundir.run import RunDir, "
            "take_lock; take_lock(RunDir(Path(sys.argv[1]))); print('locked', flush=True); "
            "time.sleep(60)",
            str(run.root),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_cli(
            ["recipe=demo", f"output_dir={run.root}", "train.resume=auto"], cwd=tmp_path
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"in use by another lmmtune train (process {holder.pid})" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    # the lock goes with the process, even killed: now the resume may take it
    assert prepare_run_dir(run.root, overwrite=False, resume="auto") == (
        run.checkpoints / "checkpoint-4"
    )


def test_a_damaged_tracking_state_is_refused_before_the_model_loads(tmp_path):
    run, _ = started_run(tmp_path)
    run.tracking.write_text("")  # what a crash mid-write left before writes were atomic
    with pytest.raises(LmmtuneError, match="tracking.json is damaged"):
        prepare_run_dir(run.root, overwrite=False, resume="auto")


def test_whole_run_loss_weights_each_logged_loss_by_the_steps_it_covers():
    from lmmtune.stages.sft import whole_run_loss

    history = [{"step": 1, "loss": 4.0}, {"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.0}]
    assert whole_run_loss(history, fallback=0.0) == pytest.approx((4 + 2 * 4 + 1 * 5) / 10)
    assert whole_run_loss([], fallback=0.5) == 0.5


def test_state_files_are_replaced_whole(tmp_path):
    from lmmtune.rundir.files import write_text_atomic

    target = tmp_path / "tracking.json"
    write_text_atomic(target, '{"run_id": "a"}')
    write_text_atomic(target, '{"run_id": "b"}')
    assert target.read_text() == '{"run_id": "b"}'
    assert [p.name for p in tmp_path.iterdir()] == ["tracking.json"]  # no temporary left


def test_resume_with_changed_images_is_refused_before_the_model_loads(tmp_path, tiny_processor):
    """Only the JSON's sha256 was compared: replaced PNGs resumed and trained on other data."""
    import os

    from lmmtune.data.checks import load_splits
    from lmmtune.rundir.resume import check_image_digests
    from tests.data.helpers import llava, save_image, write_json

    for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))):
        save_image(tmp_path / "img" / f"{name}.png", colour=colour)
    records = [llava(name, f"img/{name}.png") for name in "abc"]
    data = write_json(tmp_path / "train.json", records)
    run, cfg = started_run(tmp_path, [f"data.train={data}", f"data.eval={data}"])
    # what the first start recorded once its data check had read the images
    check_image_digests(load_splits(cfg.data, run.root, tiny_processor), run.data_digest)
    check_image_digests(load_splits(cfg.data, run.root, tiny_processor), run.data_digest)

    replaced = tmp_path / "img" / "b.png"
    stat = replaced.stat()
    save_image(replaced, colour=(31, 200, 30))  # other pixels, same size, same time stamp
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert replaced.stat().st_size == stat.st_size

    result = run_cli(
        ["recipe=demo", f"data.train={data}", f"data.eval={data}"]
        + [f"output_dir={run.root}", "train.resume=auto", "tracking=none"],
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train.resume: the images changed since this run started" in result.stderr
    assert f"data.train: 1 of 3 images have other content ({replaced})" in result.stderr
    assert f"data.eval: 1 of 3 images have other content ({replaced})" in result.stderr
    assert "lmmtune.model: loaded" not in result.stderr  # refused before the model loads
