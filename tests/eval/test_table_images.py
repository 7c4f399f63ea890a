"""Images held inside a data table (parquet bytes) show in MLflow as files do: thumbnails in
the predictions table and tiles in the sample grid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from lmmtune.config import DataColumns, TrackingConfig
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.readers import read_data
from lmmtune.eval.generate import EvalResult
from lmmtune.eval.metrics import score_predictions
from lmmtune.eval.report import log_sample_images, save_eval_report
from lmmtune.tracking.tracker import Tracker

datasets = pytest.importorskip("datasets")
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


def test_in_table_images_get_thumbnails_and_sample_tiles(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png(c), "path": None} for c in COLOURS],
            "question": ["What colour is it?"] * 3,
            "answer": ["red", "green", "blue"],
        }
    )
    table.to_parquet(tmp_path / "eval.parquet")
    samples = read_data(tmp_path / "eval.parquet", DataColumns()).samples
    assert all(s.image_ref is not None for s in samples)  # bytes in the table, no files
    answers = ["red", "green", "blue"]
    metrics, scores = score_predictions(answers, answers, [None] * 3)
    after = EvalResult(metrics=metrics, predictions=answers, scores=scores)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker()
    tracker.start_run(TrackingConfig(tracking_uri=uri), experiment="tables", run_name="t")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_eval_report(run_dir, "eval_", samples, None, after, tracker, DEFAULT_MAX_PIXELS)
    grid = log_sample_images(tracker, run_dir / "eval_predictions.jsonl", run_dir / "grid.png")
    tracker.end()

    rows = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").open()]
    for row, colour in zip(rows, COLOURS, strict=True):
        with Image.open(row["image_file"]) as copy:
            assert copy.convert("RGB").getpixel((5, 5)) == colour
    assert grid is not None  # three tiles, not "no image to show"
    with Image.open(grid) as sheet:
        assert sheet.convert("RGB").getpixel((100, 100)) == COLOURS[0]  # the first tile's image

    client = MlflowClient(uri)
    local = client.download_artifacts(tracker.run_id, "eval/predictions.json", str(tmp_path))
    logged = json.loads(Path(local).read_text())
    column = logged["columns"].index("image")
    assert all(row[column]["type"] == "image" for row in logged["data"])  # thumbnails
