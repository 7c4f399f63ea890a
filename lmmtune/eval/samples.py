"""Sample eval images with their question, reference and answers, as one picture in MLflow.

Built from the predictions the eval step already wrote (`eval_predictions.jsonl`: image,
question, reference, before, after), so nothing is generated twice. A person opening
the run sees what the model was asked and what it answered, image by image, before and
after training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

SAMPLES_FILE = "eval_samples.png"
TILE = 200  # image side in pixels
TEXT_HEIGHT = 92
GOOD, BAD, INK = (20, 120, 40), (190, 30, 30), (20, 20, 20)


def log_sample_images(tracker, predictions: Path, out: Path, count: int = 8) -> Path | None:
    """Draw up to `count` predictions that have an image into `out` and log it under eval/."""
    if not predictions.is_file():
        return None
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    rows = [row for row in rows if row.get("image_file")][:count]
    tiles = [tile for tile in (_tile(row) for row in rows) if tile is not None]
    if not tiles:
        return None
    grid(tiles).save(out)
    tracker.log_artifact(out, "eval")
    return out


def grid(tiles: list[Image.Image], columns: int = 4) -> Image.Image:
    rows = (len(tiles) + columns - 1) // columns
    width, height = tiles[0].size
    sheet = Image.new("RGB", (width * min(columns, len(tiles)), height * rows), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * width, (index // columns) * height))
    return sheet


def _tile(row: dict) -> Image.Image | None:
    try:
        # the eval report's small copy, opened as training opened the image (eval/report.py)
        with Image.open(row["image_file"]) as opened:
            image = opened.convert("RGB")
    except (KeyError, OSError, ValueError):  # no copy (the file was gone): leave it out
        return None
    scale = TILE / max(image.size)  # small scans are enlarged too, to be seen
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    tile = Image.new("RGB", (TILE, TILE + TEXT_HEIGHT), "white")
    tile.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    draw = ImageDraw.Draw(tile)
    font = _font()
    y = TILE + 4
    for text, colour in _lines(row):
        draw.text((6, y), _fit(draw, text, font), fill=colour, font=font)
        y += 15
    draw.rectangle((0, 0, TILE - 1, TILE + TEXT_HEIGHT - 1), outline=(210, 210, 210))
    return tile


def _lines(row: dict) -> list[tuple[str, tuple[int, int, int]]]:
    question = str(row.get("question", "")).replace("<image>", "")
    lines = [(f"Q: {question}", INK), (f"ref: {row.get('reference', '')}", INK)]
    for name in ("before", "after"):
        if name in row:
            correct = row.get(f"correct_{name}")
            colour = INK if correct is None else (GOOD if correct else BAD)
            mark = "" if correct is None else (" (right)" if correct else " (wrong)")
            lines.append((f"{name}: {row[name]}{mark}", colour))
    return lines


def _fit(draw: ImageDraw.ImageDraw, text: str, font) -> str:
    """Cut `text` to the tile's width, with an ellipsis."""
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= TILE - 12:
        return text
    while text and draw.textlength(text + "…", font=font) > TILE - 12:
        text = text[:-1]
    return text + "…"


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
