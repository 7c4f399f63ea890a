"""The built-in demo, offline: a tiny LLaVA with the real module tree, synthetic scans with questions, and preference pairs.

A tiny LLaVA (CLIP + Llama) built offline, for tests and the demo.

It has the module tree, processor and tokenizer of llava-hf/llava-1.5-7b-hf at a
size that trains in seconds on a CPU. The tokenizer is a small BPE trained on the
fly with a Metaspace pre-tokenizer, like Llama's SentencePiece, with every printable
ASCII character in its alphabet so that any English text tokenizes.

The built-in demo set: synthetic "scans" with or without a bright lesion.

Each image is a dark, noisy frame with a grey body outline; half carry a bright
round lesion on the left or the right. Questions are closed: "Is there a lesion?"
(yes/no) and "Which side is the lesion on?" (left/right). A second domain
(`data.demo_task=vertical`) draws the lesion at the top or the bottom and asks other
questions of the same scans: "Is the scan normal?" (normal/abnormal) and "Is the lesion
at the top or the bottom?" (top/bottom). Files are written as a
real LLaVA-format dataset on disk, so the demo goes through the same loader as
user data.

The demo's preference pairs: the demo scans and questions, the right answer chosen, a wrong one rejected.

The demo's captions (stage 1, `data.train=demo_captions`): the same scans, each described in
one sentence ("a scan with a lesion on the left"), in LLaVA's pretrain JSON shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFilter
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

from lmmtune.data.prompt import SYSTEM_PROMPT

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

DEMO = "demo"
"""`data.train=demo`: the built-in demo set instead of a file."""
DEMO_CAPTIONS = "demo_captions"
"""`data.train=demo_captions`: the demo scans with a caption each (stage 1)."""


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


PRESENCE_QUESTION = "Is there a lesion in this scan?"
SIDE_QUESTION = "Which side is the lesion on?"
NORMAL_QUESTION = "Is the scan normal?"
HEIGHT_QUESTION = "Is the lesion at the top or the bottom?"
DEMO_TASKS = {
    "side": (("left", "right"), PRESENCE_QUESTION, SIDE_QUESTION),
    "vertical": (("top", "bottom"), NORMAL_QUESTION, HEIGHT_QUESTION),
}
"""`data.demo_task`: where lesions lie, the question about a lesion's presence, the question
about where it lies. The presence answers are yes/no (side) or abnormal/normal (vertical)."""


def draw_scan(rng: random.Random, side: str | None, size=(64, 48)) -> Image.Image:
    """One scan drawn entirely from `rng`, so that `data.seed` alone fixes the data set;
    `side`: None (no lesion), left, right, top or bottom.

    The noise comes from `rng` rather than `Image.effect_noise`, whose C-level generator
    ignores the seed and changes with whatever drew noise earlier in the process.
    """
    width, height = size
    # Uniform grain in [24, 39]: a dark frame (mean ~32) with a 4-5 grey-level spread.
    noise = Image.frombytes("L", size, rng.randbytes(width * height))
    image = noise.point(lambda value: 24 + value // 16).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, width - 4, height - 4), outline=(90, 90, 90), width=2)
    if side in ("left", "right"):
        radius = rng.randint(5, 8)
        x_low, x_high = (8, width // 2 - 12) if side == "left" else (width // 2 + 12, width - 8)
        x, y = rng.randint(x_low, x_high), rng.randint(12, height - 12)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(240, 240, 230))
    elif side in ("top", "bottom"):  # x away from the edges the processor's centre crop cuts
        radius = rng.randint(5, 7)
        y_low, y_high = (10, 16) if side == "top" else (height - 16, height - 10)
        x, y = rng.randint(16, width - 16), rng.randint(y_low, y_high)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(240, 240, 230))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def write_demo_dataset(
    target: Path, size: int, seed: int, eval_share: float = 0.25, task: str = "side"
) -> tuple[Path, Path]:
    """Write `size` scans and their questions of `task` (DEMO_TASKS); return the train and
    eval JSON files."""
    rng = random.Random(seed)
    images_dir = target / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    places, presence_question, place_question = DEMO_TASKS[task]
    records = []
    for index in range(size):
        side = rng.choice([None, *places])
        name = f"scan_{index:04d}.png"
        draw_scan(rng, side).save(images_dir / name)
        presence = _presence_answer(task, side is not None)
        records.append(_record(f"{index:04d}-presence", name, presence_question, presence))
        if side is not None:
            records.append(_record(f"{index:04d}-side", name, place_question, side))
    n_eval_images = int(size * eval_share)
    is_eval = [int(record["id"][:4]) < n_eval_images for record in records]
    train_file, eval_file = target / "train.json", target / "eval.json"
    train_file.write_text(
        json.dumps([r for r, e in zip(records, is_eval, strict=True) if not e], indent=1)
    )
    eval_file.write_text(
        json.dumps([r for r, e in zip(records, is_eval, strict=True) if e], indent=1)
    )
    return train_file, eval_file


def _presence_answer(task: str, lesion: bool) -> str:
    if task == "side":
        return "yes" if lesion else "no"
    return "abnormal" if lesion else "normal"


def _record(record_id: str, image: str, question: str, answer: str) -> dict:
    return {
        "id": record_id,
        "image": f"images/{image}",
        "question_type": "closed",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


WRONG = {
    "yes": "no",
    "no": "yes",
    "left": "right",
    "right": "left",
    "top": "bottom",
    "bottom": "top",
    "normal": "abnormal",
    "abnormal": "normal",
}
"""The rejected answer of each demo answer: the other closed choice."""


def write_demo_pairs(target: Path, size: int, seed: int, task: str = "side") -> tuple[Path, Path]:
    """Write the demo set as LLaVA-style pairs (same images, ids and split as the SFT demo)."""
    files = write_demo_dataset(target, size, seed, task=task)
    for path in files:
        records = json.loads(path.read_text())
        path.write_text(json.dumps([as_pair(record) for record in records], indent=1))
    return files


def as_pair(record: dict) -> dict:
    """An SFT demo record as a pair: the question stays, the answer becomes `chosen`."""
    question, answer = record["conversations"]
    return {
        **record,
        "conversations": [question],
        "chosen": answer["value"],
        "rejected": WRONG[answer["value"]],
    }


def pair_data_config(data_cfg, work_dir: Path):
    """`data.*` with `data.train=demo` turned into the demo pair files (written to `work_dir`)."""
    if data_cfg.train != DEMO:
        return data_cfg
    train, evaluation = write_demo_pairs(
        work_dir / "demo_data", data_cfg.demo_size, data_cfg.seed, str(data_cfg.demo_task)
    )
    return OmegaConf.merge(data_cfg, {"train": str(train), "eval": str(evaluation)})


CAPTIONS = {
    None: "a normal scan with no lesion",
    "left": "a scan with a lesion on the left",
    "right": "a scan with a lesion on the right",
}
CAPTION_PROMPT = "Describe the image concisely."
"""The human turn of the demo's caption records (LLaVA's pretrain JSON has such a prompt; its
`plain` template drops it)."""


def write_demo_captions(target: Path, size: int, seed: int) -> tuple[Path, Path]:
    """The demo scans (the same images and split as `write_demo_dataset`) with one caption
    each, as LLaVA's pretrain JSON; return the train and eval files."""
    files = write_demo_dataset(target, size, seed)
    captions = []
    for path in files:
        records = json.loads(path.read_text())
        answers = {r["id"][:4]: r["conversations"][1]["value"] for r in records}  # side wins
        caption_file = path.with_name(f"captions_{path.name}")
        captions.append(caption_file)
        caption_file.write_text(
            json.dumps([caption_record(key, answer) for key, answer in answers.items()], indent=1)
        )
    return captions[0], captions[1]


def caption_record(key: str, answer: str) -> dict:
    """One scan's caption record from its last demo answer (no / yes / left / right)."""
    side = answer if answer in ("left", "right") else None
    return {
        "id": key,
        "image": f"images/scan_{key}.png",
        "conversations": [
            {"from": "human", "value": f"{CAPTION_PROMPT}\n<image>"},
            {"from": "gpt", "value": CAPTIONS[side]},
        ],
    }
