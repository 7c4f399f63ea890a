"""What the GGUF tests need beside lmmtune: a small LLaVA with the real Llama-2 vocabulary, and
llama-cpp-python built from its pinned source distribution (cached, built once per machine).

The small model is the tiny LLaVA's vision tower (56 px, 16 image tokens) with a 256-wide,
2-layer Llama on Llama-2's 32,064-row vocabulary: llama.cpp's converter writes its
tokenizer as it writes LLaVA 1.5's, k-quants (256-value blocks) apply to every matrix,
and the demo recipe trains it on a CPU in a few minutes.

llama-cpp-python compiles llama.cpp (CPU only, no BLAS, portable: -DGGML_NATIVE=OFF):
its wheel is kept in ~/.cache/lmmtune/wheels and installed into a folder of its own,
put on PYTHONPATH of the processes that need it; the test environment is left as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmmtune.demo import TINY_SPEC, default_cache_dir
from lmmtune.export.gguf_tools import LLAMA_CPP_PYTHON, cached_llama_cpp
from tests.real_tokenizer import real_processor_dir

TEXT = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
VOCAB = 32064  # llava-hf's rows: 32,000 pieces, <image>, <pad>, padding
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)


def real_vocab_llava_dir() -> Path:
    """The small LLaVA with Llama-2's tokenizer, random weights, built once into the cache."""
    target = default_cache_dir() / "real-vocab-llava-256"
    if (target / "config.json").exists():
        return target
    processor_dir = real_processor_dir(False)  # skips where npm is unreachable
    import torch
    from transformers import (
        AutoProcessor,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    real = AutoProcessor.from_pretrained(processor_dir)
    size = TINY_SPEC["vision"]["image_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        image_mean=real.image_processor.image_mean,
        image_std=real.image_processor.image_std,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=real.tokenizer,
        patch_size=TINY_SPEC["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_SPEC["vision"]),
        text_config=LlamaConfig(
            **TEXT,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=32001,
            initializer_range=TEXT["hidden_size"] ** -0.5,
        ),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(size // TINY_SPEC["vision"]["patch_size"]) ** 2,
        pad_token_id=32001,
    )
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.mul_(
            TINY_SPEC["vision_position_scale"]
        )
    model.generation_config.update(pad_token_id=32001, eos_token_id=2, bos_token_id=1)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process built the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def llama_cpp_site() -> Path:
    """A folder holding llama-cpp-python (the pinned release), for PYTHONPATH; built once.

    Building from source takes minutes on two cores: the wheel is cached, so CI builds it
    once per machine and later runs only install it (seconds)."""
    cache = default_cache_dir()
    site = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-site"
    if (site / "llama_cpp" / "__init__.py").is_file():
        return site
    wheel = cached_wheel(cache / "wheels")
    staging = site.with_name(f"{site.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # Its pure-Python needs not in lmmtune's environment; numpy and jinja2 come from there.
    pip(["install", "--no-deps", "--target", str(staging), str(wheel), "diskcache>=5.6.1"], 600)
    try:
        staging.rename(site)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return site


def cached_wheel(folder: Path) -> Path:
    """llama-cpp-python's wheel, built from the sdist lmmtune pins (CPU only) if not cached."""
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    if found:
        return found[0]
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: llama-cpp-python cannot be built here")
    cached_llama_cpp()  # the converters come from the same sdist; fetch it once
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pip(
        ["wheel", "--no-deps", "--no-binary", "llama-cpp-python", "-w", str(folder)]
        + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        timeout=3600,
        env={"CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
    )
    minutes = (time.perf_counter() - started) / 60
    (folder / "build-time.json").write_text(json.dumps({"minutes": round(minutes, 1)}))
    return next(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))


def pip(args: list[str], timeout: int, env: dict | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        pytest.fail(f"pip {args[0]} failed: {done.stderr[-3000:]}")


def with_llama_cpp(env: dict | None = None) -> dict:
    """The environment of a process that imports llama_cpp (the cached build on PYTHONPATH)."""
    paths = [str(llama_cpp_site()), os.environ.get("PYTHONPATH", "")]
    return {**(env or {}), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
