"""The built-in demo set: synthetic "scans" with or without a bright lesion.

Each image is a dark, noisy frame with a grey body outline; half carry a bright
round lesion on the left or the right. Questions are closed: "Is there a lesion?"
(yes/no) and "Which side is the lesion on?" (left/right). Files are written as a
real LLaVA-format dataset on disk, so the demo goes through the same loader as
user data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

PRESENCE_QUESTION = "Is there a lesion in this scan?"
SIDE_QUESTION = "Which side is the lesion on?"


def draw_scan(rng: random.Random, side: str | None, size=(64, 48)) -> Image.Image:
    """One scan drawn entirely from `rng`, so that `data.seed` alone fixes the data set.

    The noise comes from `rng` rather than `Image.effect_noise`, whose C-level generator
    ignores the seed and changes with whatever drew noise earlier in the process.
    """
    width, height = size
    # Uniform grain in [24, 39]: a dark frame (mean ~32) with a 4-5 grey-level spread.
    noise = Image.frombytes("L", size, rng.randbytes(width * height))
    image = noise.point(lambda value: 24 + value // 16).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, width - 4, height - 4), outline=(90, 90, 90), width=2)
    if side is not None:
        radius = rng.randint(5, 8)
        x_low, x_high = (8, width // 2 - 12) if side == "left" else (width // 2 + 12, width - 8)
        x, y = rng.randint(x_low, x_high), rng.randint(12, height - 12)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(240, 240, 230))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def write_demo_dataset(
    target: Path, size: int, seed: int, eval_share: float = 0.25
) -> tuple[Path, Path]:
    """Write `size` scans and their questions; return the train and eval JSON files."""
    rng = random.Random(seed)
    images_dir = target / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(size):
        side = rng.choice([None, "left", "right"])
        name = f"scan_{index:04d}.png"
        draw_scan(rng, side).save(images_dir / name)
        records.append(
            _record(
                f"{index:04d}-presence", name, PRESENCE_QUESTION, "no" if side is None else "yes"
            )
        )
        if side is not None:
            records.append(_record(f"{index:04d}-side", name, SIDE_QUESTION, side))
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
