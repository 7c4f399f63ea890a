"""`data.max_image_pixels` is one setting that every step honours: an image over the default
limit is refused by `check`, and with the limit raised it goes through training, eval
generation, the MLflow thumbnails and sample grid, `eval`, export parity and `predict`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from lmmtune.data.images import DEFAULT_MAX_PIXELS
from tests.conftest import run_cli
from tests.data.helpers import llava, save_image, write_json

BIG = (9500, 9460)  # 89,870,000 pixels: just over the default (PIL's own limit)
RAISED = 90_000_000


@pytest.mark.slow
def test_a_raised_limit_is_honoured_by_every_step(tmp_path):
    assert BIG[0] * BIG[1] > DEFAULT_MAX_PIXELS
    big = tmp_path / "img" / "big.png"
    big.parent.mkdir()
    Image.new("L", BIG, 90).save(big)  # one grey level: a 110 kB file, decoded in ~1 s
    for name in ("a", "b"):
        save_image(tmp_path / "img" / f"{name}.png", size=(30, 20))
    records = [llava("big", "img/big.png"), llava("a", "img/a.png"), llava("b", "img/b.png")]
    data = write_json(tmp_path / "train.json", records)
    base = [
        "recipe=demo",
        f"data.train={data}",
        f"data.eval={data}",
        "train.max_steps=2",
        "eval.max_new_tokens=2",
        "output_dir=run",
    ]

    refused = run_cli(["check", *base], cwd=tmp_path)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert str(big) in said and "data.max_image_pixels=89,478,485" in said

    raised = [*base, f"data.max_image_pixels={RAISED}"]
    trained = run_cli(raised, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").open()]
    assert rows[0]["id"] == "big" and "after" in rows[0] and "before" in rows[0]
    with Image.open(rows[0]["image_file"]) as copy:  # what MLflow's table and grid show
        assert max(copy.size) == 336 and copy.convert("L").getpixel((5, 5)) == 90
    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(tracking["run_id"], "eval")}
    assert "eval/eval_samples.png" in logged
    local = client.download_artifacts(tracking["run_id"], "eval/predictions.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    column = table["columns"].index("image")
    assert all(row[column]["type"] == "image" for row in table["data"])  # thumbnails

    evaluated = run_cli(["eval", "output_dir=run"], cwd=tmp_path)  # the run's limit
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    exported = run_cli(["export", "output_dir=run", "export.parity_samples=1"], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    report = json.loads((run_dir / "export-merged" / "export_report.json").read_text())
    assert report["parity"]["samples"] == 1 and report["parity"]["passed"]
    answered = run_cli(
        [
            "predict",
            "output_dir=run",
            f"predict.image={big}",
            "predict.question=Is there a lesion?",
        ],
        cwd=tmp_path,
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
