"""The real Llama-2 tokenizer for tests: built once from npm, skipped only where npm is unreachable."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

from benchmarks.llama_tokenizer import TokenizerUnavailable, llama2_processor_dir


def real_processor_dir(legacy: bool):
    """The llava-hf-shaped processor directory with Llama-2's vocabulary (skip without npm)."""
    try:
        return llama2_processor_dir(legacy)
    except TokenizerUnavailable as exc:
        pytest.skip(f"real Llama-2 tokenizer unavailable: {exc}")


def real_processor(legacy: bool):
    return AutoProcessor.from_pretrained(real_processor_dir(legacy))


PREPEND_REPLACE = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}


def metaspace(scheme: str) -> dict:
    return {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}


PIPELINES = {
    # transformers 4.3x's Llama converter: a "▁" before every stretch of text, also after </s>
    "4.3x normalizer": (PREPEND_REPLACE, None),
    "metaspace first": (None, metaspace("first")),
    "metaspace always": (None, metaspace("always")),
    "metaspace never": (None, metaspace("never")),
    # tokenizers < 0.15 wrote Metaspace with add_prefix_space (read back as always, split)
    "metaspace add_prefix_space": (None, {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}),
}  # fmt: skip
"""The tokenizer.json pipelines found in published Llama/Vicuna/llava-hf snapshots."""

MODEL_CONFIG = {
    "model_type": "llava",
    "architectures": ["LlavaForConditionalGeneration"],
    "image_token_index": 32000,
}
"""A llava config.json beside the tokenizer: transformers 5 then keeps tokenizer.json's pipeline."""


def tokenizer_format_dir(target, pipeline: str, legacy: bool, with_config: bool):
    """The real processor with tokenizer.json written in `pipeline`'s format and `legacy`,
    with or without a model config.json beside it (TokenizersBackend vs LlamaTokenizer)."""
    import json
    import shutil

    shutil.copytree(real_processor_dir(False), target)
    normalizer, pre_tokenizer = PIPELINES[pipeline]
    state = json.loads((target / "tokenizer.json").read_text(encoding="utf-8"))
    state["normalizer"], state["pre_tokenizer"] = normalizer, pre_tokenizer
    (target / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["legacy"] = legacy
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    if with_config:
        (target / "config.json").write_text(json.dumps(MODEL_CONFIG))
    return target
