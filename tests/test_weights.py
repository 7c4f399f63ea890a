"""eval, export and predict refuse pickled weights, and the conversion they name works."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmmtune.errors import LmmtuneError
from tests.conftest import compose_config


def test_a_pickled_adapter_is_refused_and_the_named_conversion_works(tmp_path):
    from lmmtune.finished_run import find_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    weights = {"base_model.model.lora_A.weight": torch.randn(4, 8)}
    torch.save(weights, adapter / "adapter_model.bin")
    cfg = compose_config([f"output_dir={tmp_path}"])
    with pytest.raises(LmmtuneError) as error:
        find_adapter(str(adapter), None, cfg)
    message = str(error.value)
    assert "adapter_model.bin" in message and "safetensors only" in message
    command = re.search(r'python( -c ".*?")', message).group(1)
    # the user's `python`; here this test's own (a venv's python is not on PATH unless activated)
    subprocess.run(shlex.quote(sys.executable) + command, shell=True, check=True, cwd=tmp_path)
    assert find_adapter(str(adapter), None, cfg) == adapter
    converted = load_file(adapter / "adapter_model.safetensors")
    torch.testing.assert_close(
        converted["base_model.model.lora_A.weight"], weights["base_model.model.lora_A.weight"]
    )


def test_predict_refuses_a_pickled_model(tmp_path):
    from lmmtune.finished_run import load_finished_run

    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LmmtuneError, match="pytorch_model.bin.*safetensors only"):
        load_finished_run(compose_config([]), model=str(tmp_path))


def test_shared_adapter_files_name_the_hub_id_not_a_local_path(tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from lmmtune.rundir.files import hub_id_of, name_base_by_hub_id

    assert hub_id_of("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert hub_id_of(str(tiny_model_path)) is None and hub_id_of("tiny") is None
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_path)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert str(tiny_model_path) in model.peft_config["default"].base_model_name_or_path
    name_base_by_hub_id(model, "llava-hf/llava-1.5-7b-hf")
    model.save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    card = (tmp_path / "adapter" / "README.md").read_text()
    home = str(Path.home())
    assert '"base_model_name_or_path": "llava-hf/llava-1.5-7b-hf"' in config
    assert home not in config and home not in card and "llava-hf/llava-1.5-7b-hf" in card


@pytest.mark.parametrize("named", ["./org/name", "~/models", "org/name/sub", "tiny", "/abs/org"])
def test_a_local_path_is_no_hub_id_for_the_adapter_files_or_the_model_card(named):
    from lmmtune.eval.description import front_matter, how_to_load
    from lmmtune.rundir.files import hub_id_of

    assert hub_id_of(named) is None
    assert "base_model" not in front_matter(named) and "PATH/TO/BASE/MODEL" in how_to_load(named)
