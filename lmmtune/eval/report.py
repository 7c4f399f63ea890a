"""What an evaluation leaves behind: metrics, a predictions table, a before/after chart, sample images.

What an evaluation leaves behind: metrics for MLflow, a predictions table, a before/after chart.

Shared by training (`RUN/eval_predictions.jsonl`, `RUN/eval_before_after.png`) and the
`eval` command (`RUN/eval/predictions.jsonl`, `RUN/eval/before_after.png`).

Sample eval images with their question, reference and answers, as one picture in MLflow.

Built from the predictions the eval step already wrote (`eval_predictions.jsonl`: image,
question, reference, before, after), so nothing is generated twice. A person opening
the run sees what the model was asked and what it answered, image by image, before and
after training.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError
from lmmtune.eval.generate import EvalResult, references

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "open_recall", "exact_match", "token_f1")
_UNSAFE_METRIC_CHARS = re.compile(r"[^\w\-. /]")


def metric_items(prefix: str, metrics: dict, separator: str = "/") -> dict[str, float]:
    """`{"by_type": {"closed": {"accuracy": 1}}}` -> `{"PREFIX/by_type.closed.accuracy": 1}`.

    Question types come from the data, so characters MLflow refuses in names become `_`.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{separator}{_UNSAFE_METRIC_CHARS.sub('_', str(key))}"
        if isinstance(value, dict):
            flat.update(metric_items(name, value, separator="."))
        elif isinstance(value, int | float):
            flat[name] = float(value)
    return flat


def scalar_tags(prefix: str, metrics: dict) -> dict[str, str]:
    """The eval numbers as MLflow tags (`eval_after/accuracy` -> "0.96875"), not metrics: one
    value per run would be one single-bar chart each, ahead of the loss curves."""
    return {name: _exact(value) for name, value in metric_items(prefix, metrics).items()}


def _exact(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def prediction_rows(
    samples: list[Sample], before: EvalResult | None, after: EvalResult | None
) -> list[dict]:
    """One row per sample: image, question, reference, before, after and whether each is correct."""
    rows = []
    for index, (sample, reference) in enumerate(zip(samples, references(samples), strict=True)):
        row = {
            "id": sample.id,
            "image": sample.image,
            "question": sample.turns[-1][0],
            "question_type": sample.question_type,
            "reference": reference,
        }
        for name, result in (("before", before), ("after", after)):
            if result is not None and result.predictions:  # none kept for a resumed run's before
                row[name] = result.predictions[index]
                row[f"correct_{name}"] = result.scores[index].correct
        rows.append(row)
    return rows


IMAGE_FILE = "image_file"
"""Row key of the image's small PNG copy: what MLflow's thumbnails and the sample grid show."""


def write_table_images(
    samples: list[Sample],
    rows: list[dict],
    folder: Path,
    max_image_pixels: int | None,
    side: int = 336,
):
    """Save each sample's image (a file, or bytes inside a data table) as a small PNG in `folder`.

    The images are opened here once, as training opened them (`data.max_image_pixels`
    included); MLflow's thumbnails and the sample grid then read only these copies.
    """
    from lmmtune.data.batches import load_sample_image

    for index, (sample, row) in enumerate(zip(samples, rows, strict=True)):
        if sample.image is None:
            continue
        try:
            image = load_sample_image(sample, max_image_pixels)
        except LmmtuneError as exc:  # a file gone since the eval: shown without its picture
            log.warning("no thumbnail: %s", exc)
            continue
        image.thumbnail((side, side))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.png"
        image.save(path)
        row[IMAGE_FILE] = str(path.resolve())  # readable from any working directory


def without_file(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != IMAGE_FILE}


def write_predictions(rows: list[dict], path: Path) -> Path:
    """Rows as JSON lines (UTF-8 kept readable): eval predictions and `predict` answers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def plot_before_after(before: dict | None, after: dict | None, path: Path) -> Path:
    """Grouped bars of the headline metrics (and accuracy per question type) before and after."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = _chart_metrics(before or {}, after or {})
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.2))
    width = 0.38
    for offset, (label, metrics, colour) in enumerate(
        (("before", before, "#9aa5b1"), ("after", after, "#2f6fdb"))
    ):
        if metrics is None:
            continue
        values = [_lookup(metrics, name) for name in names]
        positions = [i + (offset - 0.5) * width for i in range(len(names))]
        bars = axis.bar(positions, values, width, label=label, color=colour)
        axis.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7)
    axis.set_xticks(range(len(names)), [n.replace("by_type.", "") for n in names], fontsize=8)
    axis.set_ylim(0, 1.1)
    samples = int((after or before or {}).get("samples", 0))
    axis.set_title(f"before / after training, {samples} eval samples", fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _chart_metrics(before: dict, after: dict) -> list[str]:
    present = {**before, **after}
    names = [name for name in HEADLINE if name in present]
    by_type = {**before.get("by_type", {}), **after.get("by_type", {})}
    if len(by_type) > 1:  # one type only would repeat the overall bar
        names += [f"by_type.{kind}.accuracy" for kind in by_type if "accuracy" in by_type[kind]]
    return names


def _lookup(metrics: dict, name: str) -> float:
    value = metrics
    for part in name.split(".", 2) if name.startswith("by_type.") else [name]:
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return float(value) if isinstance(value, int | float) else 0.0


def save_eval_report(
    out_dir: Path,
    prefix: str,
    samples: list[Sample],
    before: EvalResult | None,
    after: EvalResult | None,
    tracker,
    max_image_pixels: int | None,
    table_images: bool = True,
) -> dict[str, Path]:
    """Write `PREFIXpredictions.jsonl` and `PREFIXbefore_after.png` to `out_dir`, log both to MLflow."""
    rows = prediction_rows(samples, before, after)
    write_table_images(samples, rows, out_dir / f"{prefix}images", max_image_pixels)
    files = {
        "predictions": write_predictions(rows, out_dir / f"{prefix}predictions.jsonl"),
        "chart": plot_before_after(
            before and before.metrics,
            after and after.metrics,
            out_dir / f"{prefix}before_after.png",
        ),
    }
    shown = [{**without_file(row), "image": row.get(IMAGE_FILE)} for row in rows]
    tracker.log_table(
        shown, "eval/predictions.json", image_column="image" if table_images else None
    )
    tracker.log_artifact(files["chart"], "eval")
    tracker.log_artifact(files["predictions"], "eval")
    return files


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
