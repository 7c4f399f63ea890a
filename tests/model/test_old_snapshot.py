"""An older llava-hf snapshot (processor_config.json without `num_additional_image_tokens`)
loads, trains, evaluates and exports: the image-token count comes from the vision config."""

from __future__ import annotations

import json
import shutil

import pytest

from lmmtune.config import ModelConfig
from lmmtune.data.batches import image_token_count
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def old_snapshot(tiny_model_path, tmp_path_factory):
    target = tmp_path_factory.mktemp("old") / "llava-old"
    shutil.copytree(tiny_model_path, target)
    config_file = target / "processor_config.json"
    config = json.loads(config_file.read_text())
    del config["num_additional_image_tokens"]
    config_file.write_text(json.dumps(config))
    return target


def test_processor_counts_the_towers_tokens(old_snapshot):
    from transformers import AutoProcessor

    from lmmtune.model import load_processor

    assert image_token_count(AutoProcessor.from_pretrained(old_snapshot)) == 15  # transformers'
    processor = load_processor(ModelConfig(path=str(old_snapshot)))
    assert image_token_count(processor) == 16  # (56/14)^2 patches + CLS - CLS
    text = processor(text="<image>", images=[_image()], return_tensors="pt")["input_ids"][0]
    assert text.tolist().count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 16


def _image():
    from PIL import Image

    return Image.new("RGB", (56, 56), (10, 20, 30))


@pytest.mark.slow  # three CLI runs: ~40 s of CPU, minutes on a busy machine
def test_old_snapshot_trains_evaluates_and_exports(old_snapshot, tmp_path):
    common = [f"model.path={old_snapshot}", "output_dir=run", "tracking=none"]
    train = run_cli(
        [
            "train",
            "recipe=demo",
            *common,
            "data.demo_size=40",
            "train.max_steps=2",
            "data.max_eval_samples=4",
        ],
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    evaluated = run_cli(["eval", *common], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    exported = run_cli(["export", *common, "export.parity_samples=2"], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    saved = json.loads(next((tmp_path / "run").glob("export*/processor_config.json")).read_text())
    assert saved["num_additional_image_tokens"] == 1
