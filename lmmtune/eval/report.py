"""What an evaluation leaves behind: metrics for MLflow, a predictions table, a before/after chart.

Shared by training (`RUN/eval_predictions.jsonl`, `RUN/eval_before_after.png`) and the
`eval` command (`RUN/eval/predictions.jsonl`, `RUN/eval/before_after.png`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError
from lmmtune.eval.evaluate import EvalResult, references

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
    from lmmtune.data.dataset import load_sample_image

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
