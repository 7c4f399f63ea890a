"""The real Llama-2 tokenizer for tests: built once from npm, skipped only where npm is unreachable."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

from lmmtune.model.llama_tokenizer import TokenizerUnavailable, llama2_processor_dir


def real_processor_dir(legacy: bool):
    """The llava-hf-shaped processor directory with Llama-2's vocabulary (skip without npm)."""
    try:
        return llama2_processor_dir(legacy)
    except TokenizerUnavailable as exc:
        pytest.skip(f"real Llama-2 tokenizer unavailable: {exc}")


def real_processor(legacy: bool):
    return AutoProcessor.from_pretrained(real_processor_dir(legacy))
