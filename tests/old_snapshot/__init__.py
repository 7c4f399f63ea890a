"""A LLaVA 1.5 checkpoint in the formats the published llava-hf snapshots were written in.

`write_snapshot.py` runs under transformers 4.36 in a side virtualenv (built once with pip
into the lmmtune cache, like the real vocabulary) and writes what that library wrote:
config.json with partial sub-configs, sharded safetensors with their index and 4.36's
weight names, generation_config.json, tokenizer.json in the converter's normalizer format,
tokenizer_config.json, special_tokens_map.json and a centre-cropping CLIPImageProcessor.
Two files 4.36 never wrote are added here as llava-hf added them to its snapshots later:
`chat_template.json` (llava-hf's own template) and `processor_config.json`, with or
without `num_additional_image_tokens` (older snapshots lack it). Tests skip with a one-line
reason where pip or npm cannot be reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmmtune.demo import default_cache_dir
from tests.real_tokenizer import real_processor_dir

WRITER = Path(__file__).with_name("write_snapshot.py")
OLD_TRANSFORMERS = ["transformers==4.36.2", "tokenizers==0.15.2", "numpy<2", "pillow"]
"""What the side virtualenv holds besides torch (the version of this environment's torch,
which pip takes from the machine's wheel cache where there is one)."""

LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""llava-hf's chat template as its snapshots carry it: `USER: <image>\\n... ASSISTANT:`, no
system line, no `</s>` after answers (lmmtune trains and exports its own)."""
FULL_DEPTH = {"7b": "32", "13b": "40"}
PROCESSOR_CONFIG = {
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}


def side_python() -> Path:
    """The side virtualenv's python with transformers 4.36 (built once; skip if pip fails)."""
    import torch

    folder = default_cache_dir() / "venv-transformers-4.36"
    python = folder / "bin" / "python"
    if (folder / "ready").is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    steps = [
        [sys.executable, "-m", "venv", str(folder)],
        [str(python), "-m", "pip", "install", "-q", *OLD_TRANSFORMERS, torch_pin],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot build the transformers 4.36 virtualenv: {last}")
    (folder / "ready").write_text("")
    return python


def old_snapshot_dir(width: str = "7b", weights: bool = True) -> Path:
    """The cached snapshot (`width` 7b or 13b), written once: with random weights at 2 text
    and 3 vision layers, or without weights at the real depth (40 and 24 layers for 13B)."""
    vocab = real_processor_dir(False) / "tokenizer.json"
    spec = f"{width}-{weights}-" + hashlib.sha256(WRITER.read_bytes()).hexdigest()[:10]
    target = default_cache_dir() / f"llava-hf-4.36-snapshot-{spec}"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [str(side_python()), str(WRITER), "--vocab", str(vocab), "--out", str(tmp)]
    command += ["--width", width]
    command += (
        ["--weights"] if weights else ["--text-layers", FULL_DEPTH[width], "--vision-layers", "24"]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_CHAT_TEMPLATE}))
    set_processor_config(tmp, additional_image_tokens=False)
    try:
        tmp.rename(target)  # a half-written snapshot is never picked up
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def set_processor_config(folder: Path, additional_image_tokens: bool) -> None:
    """processor_config.json as llava-hf's older (without) or newer (with) snapshots have it."""
    config = dict(PROCESSOR_CONFIG)
    if additional_image_tokens:
        config["num_additional_image_tokens"] = 1
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2))


def snapshot_copy(target: Path, additional_image_tokens: bool, weights: bool = True) -> Path:
    """A copy of the 7B-width snapshot to change (its weight shards hard-linked, not copied)."""
    source = old_snapshot_dir("7b", weights=True)
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.suffix == ".safetensors":
            if weights:
                os.link(file, target / file.name)
        else:
            shutil.copy(file, target / file.name)
    set_processor_config(target, additional_image_tokens)
    return target
