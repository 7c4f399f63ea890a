"""A tiny LLaVA (CLIP + Llama) built offline, for tests and the demo.

It has the module tree, processor and tokenizer of llava-hf/llava-1.5-7b-hf at a
size that trains in seconds on a CPU. The tokenizer is a small BPE trained on the
fly with a Metaspace pre-tokenizer, like Llama's SentencePiece, with every printable
ASCII character in its alphabet so that any English text tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lmmtune.data.template import SYSTEM_PROMPT

TINY_NAME = "tiny"
IMAGE_SIZE = 56
PATCH_SIZE = 14
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Words the demo and tests use, so that they become whole tokens.
CORPUS = [
    SYSTEM_PROMPT,
    "USER: ASSISTANT: Is there a lesion in this scan? Which side is the lesion on? "
    "yes no left right Yes No Left Right none top bottom What is shown in the image? "
    "Describe the image. Is the scan normal? abnormal normal the a an of in on is are",
]
TINY_SPEC = {
    "vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    },
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
    "vocab_size": 400,
    # Init std of the language model and projector. Llama's 0.02 suits 4096-wide layers;
    # at width 64 each random linear shrinks its input ~6x (0.02 * sqrt(64)), so the image
    # barely reached the answer token and the demo learned to ignore it (side question at
    # chance for some seeds). 0.1, about 1/sqrt(64), keeps signals at scale: the demo
    # learns both questions in ~100 steps.
    "initializer_range": 0.1,
    # Random patch embeddings sum 14*14*3 pixels and drown the position embeddings, so
    # a random tower blurs left and right; scaled up, location survives (measured: a
    # probe on the tower's tokens learns the side 4x faster, the demo ~1.5x).
    "vision_position_scale": 20.0,
    "seed": 0,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMMTUNE_CACHE", Path.home() / ".cache" / "lmmtune"))


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory of the cached tiny LLaVA, built on first use (deterministic: same spec, same weights)."""
    spec_hash = hashlib.sha256(json.dumps(TINY_SPEC, sort_keys=True).encode()).hexdigest()[:10]
    target = (cache_dir or default_cache_dir()) / f"tiny-llava-{spec_hash}"
    if not (target / "config.json").exists():
        build_tiny_llava(target)
    return target


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPEC["vocab_size"] - 16,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
        padding_side="right",
        model_max_length=TINY_SPEC["text"]["max_position_embeddings"],
    )


def build_tiny_processor() -> LlavaProcessor:
    tokenizer = build_tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_tiny_llava(target: Path) -> Path:
    """Build and save a random-init tiny LLaVA with its processor into `target`."""
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(TINY_SPEC["seed"])
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_SPEC["vision"]),
        text_config=LlamaConfig(
            **TINY_SPEC["text"],
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=TINY_SPEC["initializer_range"],
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.mul_(
            TINY_SPEC["vision_position_scale"]
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a half-written model is never picked up
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target
