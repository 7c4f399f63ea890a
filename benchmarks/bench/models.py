"""LLaVA-1.5-shaped configs and random-weight checkpoints that load like the real ones.

A random checkpoint is written shard by shard (never the whole model in CPU memory)
and then loaded with `lmmtune.model.load_model`, so the benchmark quantizes
exactly as a training run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lmmtune.demo import default_cache_dir

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB = 32064
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
# Text and vision towers per scale. tiny/small keep LLaVA 1.5's 576 image tokens and
# its vocabulary (so the share of image positions and the logits size are realistic)
# at widths a CPU trains in seconds.
SCALES = {
    "tiny": {
        "text": {
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "vision": {
            **CLIP_L_336,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 64,
        },
    },
    "small": {
        "text": {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
        },
        "vision": {
            **CLIP_L_336,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 128,
        },
    },
    "7b": {
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        },
        "vision": CLIP_L_336,
    },
    "13b": {
        "text": {
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
        },
        "vision": CLIP_L_336,
    },
}
SHARD_BYTES = 2 * 2**30


def llava_config(scale: str) -> LlavaConfig:
    """The config of llava-hf/llava-1.5-{7b,13b}-hf, or a narrow model with the same layout."""
    spec = SCALES[scale]
    return llava_layout(spec["text"], spec["vision"])


def llava_layout(text: dict, vision: dict, feature_layer: int = -2, **text_extra) -> LlavaConfig:
    """LLaVA 1.5's layout (Vicuna's vocabulary and special ids, the 576-token projector) with
    the given language-model and vision-tower sizes; `text_extra`: more LlamaConfig keys."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            **text,
            num_key_value_heads=text["num_attention_heads"],
            vocab_size=VOCAB,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=1,
            eos_token_id=2,
            **text_extra,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
        pad_token_id=PAD_TOKEN_ID,
    )


def random_checkpoint(scale: str, dtype: torch.dtype, cache_dir: Path | None = None) -> Path:
    """Directory of a random-weight LLaVA of `scale` in `dtype`, written on first use."""
    config = llava_config(scale)
    key = json.dumps([config.to_dict(), str(dtype)], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    target = (cache_dir or default_cache_dir()) / "bench" / f"llava-{scale}-{digest}"
    if not (target / "config.json").exists():
        write_random_checkpoint(config, target, dtype)
    return target


def write_random_checkpoint(config: LlavaConfig, target: Path, dtype: torch.dtype) -> Path:
    """Save random weights for `config` as safetensors shards, one shard in memory at a time.

    Weights ~ N(0, 0.02) like the models' own init, norm scales 1, biases 0. The
    tensors are drawn on the GPU when there is one (a 13B model in seconds).
    """
    with torch.device("meta"):
        shapes = {
            name: t.shape for name, t in LlavaForConditionalGeneration(config).state_dict().items()
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0
    for name, shape in shapes.items():
        tensor = _init_tensor(name, shape, dtype, device, generator).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            total += _flush(shard, tmp, weight_map)
            shard, shard_bytes = {}, 0
    total += _flush(shard, tmp, weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a half-written checkpoint is never picked up
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _init_tensor(name, shape, dtype, device, generator) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if "norm" in name or "layrnorm" in name:  # CLIP spells one "pre_layrnorm"
        return torch.ones(shape, dtype=dtype, device=device)
    tensor = torch.empty(shape, dtype=dtype, device=device)
    return tensor.normal_(0.0, 0.02, generator=generator)


def _flush(shard: dict[str, torch.Tensor], folder: Path, weight_map: dict[str, str]) -> int:
    if not shard:
        return 0
    filename = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_file(shard, str(folder / filename), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, filename))
    return sum(t.numel() * t.element_size() for t in shard.values())
