"""A VQA-RAD-shaped synthetic set: ~10 questions per image, closed and open, all learnable.

Each image is a scan in the style of the demo's (`lmmtune.demo`): a dark noisy frame
with a grey body outline; two in three carry one bright lesion, which has a side
(left/right), a half (upper/lower) and a size (small/large). Each image is asked 8 to
12 of the questions below (10 on average, as VQA-RAD's ~11), seven closed (yes/no) and
five open, so that closed questions are ~58% of the set, as in VQA-RAD. Every answer
follows from the pixels, so a model can learn the task; the answers to the questions
of one image share what they depend on, as a real set's do.

Written as LLaVA JSON records with `question_type`, train and eval split by image, so
the data goes through lmmtune's own reader, data check and grouping.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SCAN_SIZE = 96
"""Pixels per side of a scan (the processor resizes it to 336, as it would a real one)."""
QUESTIONS_PER_IMAGE = (8, 12)


@dataclass(frozen=True)
class Finding:
    """What a scan shows: no lesion (`side` None), or one lesion with its side, half, size."""

    side: str | None
    half: str = ""
    size: str = ""

    def where(self) -> str:
        return f"{self.half} {self.side}" if self.side else "none"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# (question, "closed"/"open", answer from the finding)
QUESTIONS: list[tuple[str, str, Callable[[Finding], str]]] = [
    ("Is there a lesion in this scan?", "closed", lambda f: _yes(f.side is not None)),
    ("Is the scan normal?", "closed", lambda f: _yes(f.side is None)),
    ("Is there an abnormality?", "closed", lambda f: _yes(f.side is not None)),
    ("Is the lesion on the left?", "closed", lambda f: _yes(f.side == "left")),
    ("Is the lesion on the right?", "closed", lambda f: _yes(f.side == "right")),
    ("Is the lesion in the upper half?", "closed", lambda f: _yes(f.half == "upper")),
    ("Is the lesion large?", "closed", lambda f: _yes(f.size == "large")),
    ("Which side is the lesion on?", "open", lambda f: f.side or "none"),
    ("Where is the lesion?", "open", Finding.where),
    ("What size is the lesion?", "open", lambda f: f.size or "none"),
    ("Which half of the scan holds the lesion?", "open", lambda f: f.half or "none"),
    (
        "What is abnormal in this scan?",
        "open",
        lambda f: f"a {f.size} lesion on the {f.side}" if f.side else "nothing",
    ),
]


def draw_finding(rng: random.Random) -> Finding:
    side = rng.choice([None, "left", "right"])
    if side is None:
        return Finding(None)
    return Finding(side, rng.choice(["upper", "lower"]), rng.choice(["small", "large"]))


def draw_scan(rng: random.Random, finding: Finding, size: int = SCAN_SIZE) -> Image.Image:
    """A scan drawn entirely from `rng` (the demo's noise, outline and blur)."""
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size))
    image = noise.point(lambda value: 24 + value // 16).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, size - 4, size - 4), outline=(90, 90, 90), width=2)
    if finding.side is not None:
        radius = rng.randint(5, 7) if finding.size == "small" else rng.randint(11, 14)
        middle, margin = size // 2, 8 + radius
        x_low, x_high = (margin, middle - 6 - radius)
        y_low, y_high = (margin, middle - 6 - radius)
        x = (
            rng.randint(x_low, x_high)
            if finding.side == "left"
            else size - rng.randint(x_low, x_high)
        )
        y = (
            rng.randint(y_low, y_high)
            if finding.half == "upper"
            else size - rng.randint(y_low, y_high)
        )
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(240, 240, 230))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def write_vqa_set(
    target: Path, train_images: int, eval_images: int, seed: int = 0
) -> tuple[Path, Path]:
    """Write the scans and their questions under `target`; the train and eval JSON files
    (the split is by image: no eval image is trained on)."""
    rng = random.Random(seed)
    (target / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for index in range(train_images + eval_images):
        finding = draw_finding(rng)
        name = f"images/scan_{index:04d}.png"
        draw_scan(rng, finding).save(target / name)
        asked = rng.sample(range(len(QUESTIONS)), rng.randint(*QUESTIONS_PER_IMAGE))
        split = splits["train" if index < train_images else "eval"]
        for number in asked:
            question, kind, answer = QUESTIONS[number]
            split.append(
                _record(f"{index:04d}-q{number:02d}", name, question, kind, answer(finding))
            )
    files = target / "train.json", target / "eval.json"
    for path, records in zip(files, splits.values(), strict=True):
        path.write_text(json.dumps(records, indent=1))
    return files


def _record(record_id: str, image: str, question: str, kind: str, answer: str) -> dict:
    return {
        "id": record_id,
        "image": image,
        "question_type": kind,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }
