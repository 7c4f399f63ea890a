"""4-bit loading keeps the vision side unquantized; LoRA touches only the language model."""

from __future__ import annotations

import importlib.util

import bitsandbytes as bnb
import pytest
import torch

from lmmtune.config import LLM_LINEARS, ModelConfig, PeftConfig, QuantConfig
from lmmtune.errors import LmmtuneError
from lmmtune.model import (
    apply_lora,
    load_model,
    resolve_attention,
    resolve_model_path,
    trainable_report,
)

TINY = ModelConfig(path="tiny", dtype="float32")
QLORA = QuantConfig(mode="4bit", compute_dtype="float32")


def _linears(model, part: str) -> dict[str, torch.nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if part in name and isinstance(m, torch.nn.Linear)
    }


@pytest.fixture(scope="module")
def qlora_base(tiny_model_path):
    return load_model(TINY, QLORA)


def test_4bit_quantizes_the_language_model_only(qlora_base):
    llm = _linears(qlora_base, "language_model")
    assert llm and all(isinstance(m, bnb.nn.Linear4bit) for m in llm.values())
    assert {m.weight.quant_state.quant_type for m in llm.values()} == {"nf4"}
    for part in ("vision_tower", "multi_modal_projector", "lm_head"):
        modules = _linears(qlora_base, part)
        assert modules, part
        assert not any(
            isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in modules.values()
        ), part
        assert all(m.weight.dtype == torch.float32 for m in modules.values()), part


def test_no_quantization_mode_keeps_plain_linears(tiny_model_path):
    model = load_model(TINY, QuantConfig(mode="none"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.parametrize("train_projector", [True, False])
def test_lora_wraps_only_language_model_linears(tiny_model_path, train_projector):
    model = apply_lora(
        load_model(TINY, QLORA), PeftConfig(r=4, alpha=8, train_projector=train_projector), True
    )
    lora_modules = [
        name for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)
    ]
    n_layers = model.base_model.model.config.text_config.num_hidden_layers
    assert len(lora_modules) == n_layers * len(LLM_LINEARS)
    assert all("language_model" in name for name in lora_modules)
    assert not any(
        "vision_tower" in name for name, _ in model.named_parameters() if "lora_" in name
    )

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in name for name in trainable)
    projector = {name for name in trainable if "multi_modal_projector" in name}
    assert bool(projector) is train_projector
    report = trainable_report(model)
    assert report.lora == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert (report.projector > 0) is train_projector
    assert report.other == 0 and report.lm_head == 0


def test_trainable_report_counts_4bit_weights_as_logical_parameters(qlora_base):
    from transformers import LlavaForConditionalGeneration

    from lmmtune.model import resolve_model_path

    full = LlavaForConditionalGeneration.from_pretrained(resolve_model_path(TINY))
    assert trainable_report(qlora_base).total == sum(p.numel() for p in full.parameters())


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(LmmtuneError) as error:
        resolve_model_path(ModelConfig(path="llava-hf/llava-1.5-7b-hf"))
    message = str(error.value)
    assert "llava-hf/llava-1.5-7b-hf" in message and "model.path=" in message


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(LmmtuneError, match="is not a directory"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "nowhere" / "model")))


def test_auto_attention_is_sdpa_without_flash_attn_and_named_kernels_pass_through():
    flash_ready = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    expected = "flash_attention_2" if flash_ready else "sdpa"
    assert resolve_attention("auto", "bfloat16") == expected
    assert resolve_attention("auto", "float32") == "sdpa"  # FlashAttention-2 needs 16-bit inputs
    assert resolve_attention("eager", "bfloat16") == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn here")
def test_flash_attention_without_flash_attn_is_a_clear_error(tiny_model_path):
    config = ModelConfig(path="tiny", dtype="bfloat16", attn_implementation="flash_attention_2")
    with pytest.raises(LmmtuneError) as error:
        load_model(config, QuantConfig(mode="none"))
    message = str(error.value)
    assert "model.attn_implementation=flash_attention_2" in message
    assert "FlashAttention2" in message and "model.attn_implementation=auto" in message
