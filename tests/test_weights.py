"""eval, export and predict refuse pickled weights, and the conversion they name works."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from lmmtune.errors import LmmtuneError
from tests.conftest import compose_config


def test_a_pickled_adapter_is_refused_and_the_named_conversion_works(tmp_path):
    from lmmtune.runs import find_adapter

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
    command = re.search(r'(python -c ".*?")', message).group(1)
    subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    assert find_adapter(str(adapter), None, cfg) == adapter
    converted = load_file(adapter / "adapter_model.safetensors")
    torch.testing.assert_close(
        converted["base_model.model.lora_A.weight"], weights["base_model.model.lora_A.weight"]
    )


def test_predict_refuses_a_pickled_model(tmp_path):
    from lmmtune.predict import load_merged

    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LmmtuneError, match="pytorch_model.bin.*safetensors only"):
        load_merged(tmp_path)
