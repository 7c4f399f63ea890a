"""eval/export/predict take a run's settings from RUN/config.yaml; the command line still wins."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from lmmtune.errors import LmmtuneError
from lmmtune.finished_run import find_adapter, find_run_dir, run_settings
from tests.conftest import compose_config


@pytest.fixture()
def run_dir(tmp_path):
    """A finished demo run as far as settings go: config.yaml and an adapter directory."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    OmegaConf.save(compose_config(["recipe=demo", "peft.r=4"]), run / "config.yaml", resolve=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    return run


def test_the_runs_settings_are_used_without_a_recipe(run_dir):
    overrides = [f"output_dir={run_dir}"]
    cfg = compose_config(overrides)
    assert cfg.model.path != "tiny"  # the plain config knows nothing of the run
    settings = run_settings(cfg, find_run_dir(cfg, None), None, overrides)
    assert settings.name == "demo" and settings.model.path == "tiny"
    assert settings.peft.r == 4 and settings.quant.compute_dtype == "float32"
    assert settings.data.train == "demo" and settings.eval.max_new_tokens == 3


def test_command_line_overrides_win_over_the_run(run_dir):
    overrides = [f"output_dir={run_dir}", "model.dtype=bfloat16", "quant=none", "eval.batch_size=2"]
    cfg = compose_config(overrides)
    settings = run_settings(cfg, run_dir, None, overrides)
    assert settings.model.dtype == "bfloat16" and settings.model.path == "tiny"
    assert settings.quant.mode == "none"  # a group choice replaces the run's whole section
    assert settings.eval.batch_size == 2 and settings.eval.max_new_tokens == 3


def test_the_base_the_adapter_was_trained_on_is_used_while_it_exists(run_dir, tmp_path):
    base = tmp_path / "base-it-trained-on"
    base.mkdir()
    record = run_dir / "adapter" / "lmmtune_base.json"
    record.write_text(json.dumps({"base_model": str(base)}))
    adapter = run_dir / "adapter"
    assert run_settings(compose_config([]), run_dir, adapter, []).model.path == str(base)
    pinned = ["model.path=/elsewhere"]
    assert run_settings(compose_config(pinned), run_dir, adapter, pinned).model.path == "/elsewhere"
    record.write_text(json.dumps({"base_model": str(tmp_path / "gone")}))
    assert run_settings(compose_config([]), run_dir, adapter, []).model.path == "tiny"


def test_the_run_is_found_from_its_adapter_or_checkpoint(run_dir):
    checkpoint = run_dir / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    cfg = compose_config([])
    assert find_run_dir(cfg, str(run_dir / "adapter")) == run_dir
    assert find_run_dir(cfg, str(checkpoint)) == run_dir
    assert find_adapter(None, run_dir, cfg) == run_dir / "adapter"
    with pytest.raises(LmmtuneError, match="no adapter in .*checkpoint-10"):
        find_adapter(str(checkpoint), run_dir, cfg)


def test_eval_data_file_gives_its_valid_records_checked_as_training_checks(
    tmp_path, tiny_processor
):
    from lmmtune.errors import DataError
    from lmmtune.finished_run import eval_samples
    from tests.data.helpers import llava, save_image, write_json

    save_image(tmp_path / "img" / "a.png")
    records = [llava("a", "img/a.png"), llava("b", "img/missing.png"), llava("t", None)]
    path = write_json(tmp_path / "extra.json", records)

    samples = eval_samples(compose_config(["data.on_error=skip"]), None, tiny_processor, str(path))
    assert [s.id for s in samples] == ["a", "t"]  # every valid record, none held back
    assert samples[0].image == str(tmp_path / "img" / "a.png")
    with pytest.raises(DataError, match="missing.png"):
        eval_samples(compose_config([]), None, tiny_processor, str(path))


def test_data_eval_on_a_demo_run_replaces_its_eval_split(run_dir, tmp_path, tiny_processor):
    """`eval` and the chat's examples read a demo run's eval split; data.eval was ignored."""
    from lmmtune.chat.answer import eval_examples
    from lmmtune.demo import write_demo_dataset
    from lmmtune.finished_run import eval_samples
    from tests.data.helpers import llava, save_image, write_json

    write_demo_dataset(run_dir / "demo_data", 12, 0)
    save_image(tmp_path / "mine" / "x.png")
    mine = write_json(tmp_path / "mine" / "eval.json", [llava("mine-1", "x.png")])
    demo = compose_config([f"output_dir={run_dir}"])
    settings = run_settings(demo, run_dir, None, [f"output_dir={run_dir}"])
    assert "mine-1" not in [s.id for s in eval_samples(settings, run_dir, tiny_processor, None)]

    overrides = [f"output_dir={run_dir}", f"data.eval={mine}"]
    settings = run_settings(compose_config(overrides), run_dir, None, overrides)
    assert [s.id for s in eval_samples(settings, run_dir, tiny_processor, None)] == ["mine-1"]
    (example,) = eval_examples(settings, run_dir, tiny_processor, 6)
    assert example.image == str(tmp_path / "mine" / "x.png")


def test_the_chat_names_the_base_model_not_its_local_folder(run_dir, tiny_model_path):
    from lmmtune.chat.answer import model_name
    from lmmtune.rundir.run import base_model_file

    base_model_file(run_dir / "adapter").write_text(
        json.dumps({"base_model": str(tiny_model_path)})
    )
    overrides = [f"output_dir={run_dir}"]
    settings = run_settings(compose_config(overrides), run_dir, run_dir / "adapter", overrides)
    assert settings.model.path == str(tiny_model_path)  # a cache folder in a home directory
    assert model_name(settings, run_dir, run_dir / "adapter") == "tiny"  # as the run names it
    settings.model.path = "llava-hf/llava-1.5-7b-hf"  # a hub id given on the command line
    assert model_name(settings, run_dir, run_dir / "adapter") == "llava-hf/llava-1.5-7b-hf"
    settings.model.path = "/models/llava-1.5-7b-hf"
    assert model_name(settings, run_dir, run_dir / "adapter") == "llava-1.5-7b-hf"


def test_every_command_finds_a_finished_run_the_same_way(run_dir, tmp_path):
    """An adapter, an adapter export or a merged export of a run: the run's settings and
    folder; a merged folder outside a run (a registry download): the command's own."""
    from lmmtune.finished_run import load_finished_run

    cfg = compose_config([])
    adapted = load_finished_run(cfg, adapter=str(run_dir / "adapter"), overrides=[])
    assert (adapted.run_dir, adapted.adapter, adapted.merged) == (
        run_dir,
        run_dir / "adapter",
        None,
    )
    assert adapted.settings.peft.r == 4 and adapted.folder == run_dir
    (run_dir / "export-adapter").mkdir()
    (run_dir / "export-adapter" / "adapter_config.json").write_text("{}")
    exported = load_finished_run(cfg, model=str(run_dir / "export-adapter"), overrides=[])
    assert exported.adapter == run_dir / "export-adapter" and exported.run_dir == run_dir
    merged_dir = run_dir / "export-merged"
    merged_dir.mkdir()
    (merged_dir / "config.json").write_text("{}")
    merged = load_finished_run(cfg, model=str(merged_dir), overrides=[])
    assert (merged.run_dir, merged.adapter, merged.merged) == (run_dir, None, merged_dir)
    assert merged.settings.peft.r == 4 and merged.base_model == str(merged_dir)
    alone = load_finished_run(cfg, model=str(merged_dir), overrides=[], in_a_run=False)
    assert alone.run_dir is None and alone.settings.peft.r != 4
    with pytest.raises(LmmtuneError, match="chat.model=.* is not a model directory"):
        load_finished_run(cfg, model=str(tmp_path), overrides=[], model_key="chat.model")
