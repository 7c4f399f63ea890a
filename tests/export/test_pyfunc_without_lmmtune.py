"""The run's logged adapter model answers where lmmtune is not installed, as lmmtune does."""

from __future__ import annotations

import json
import os
import site
import subprocess
import venv
from pathlib import Path

import pytest

from tests.conftest import run_cli

LOAD_AND_ANSWER = """
import json, sys
import mlflow, pandas as pd
experiments = [e.experiment_id for e in mlflow.search_experiments()]
(model,) = mlflow.search_logged_models(
    experiments, filter_string="name = 'adapter_model'", output_format="list"
)
answerer = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
answers = answerer.predict(pd.DataFrame(json.loads(sys.argv[1])), params={"max_new_tokens": 8})
print(json.dumps(list(answers)))
"""


def python_without_lmmtune(folder: Path) -> Path:
    """A virtual environment that sees this one's packages but not lmmtune: their folders
    are on its path as plain paths, so the .pth files in them (lmmtune's editable-install
    finder among them) never run."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    (packages,) = folder.glob("lib/python*/site-packages")
    (packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = folder / "bin" / "python"
    found = subprocess.run([python, "-c", "import lmmtune"], cwd=folder, capture_output=True)
    if found.returncode == 0:
        pytest.skip("lmmtune is installed into site-packages itself (not editable)")
    assert b"No module named 'lmmtune'" in found.stderr, found.stderr
    return python


@pytest.mark.slow
def test_logged_adapter_model_answers_without_lmmtune_as_lmmtune_predicts(tmp_path):
    steps = ["train.max_steps=40", "data.demo_size=64", "eval.before=false", "eval.after=false"]
    trained = run_cli(["recipe=demo", "output_dir=run", *steps], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    data_dir = tmp_path / "run" / "demo_data"
    rows = [
        {
            "question": r["conversations"][0]["value"].split("\n", 1)[1],
            "image": str(data_dir / r["image"]),
        }
        for r in json.loads((data_dir / "eval.json").read_text())[:4]
    ]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    predict = ["predict.input=questions.jsonl", "predict.output=answers.jsonl"]
    predict += ["predict.max_new_tokens=8", "predict.batch_size=1"]  # the pyfunc: row by row
    predicted = run_cli(["predict", "output_dir=run", *predict], cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    lmmtune_answers = [json.loads(line)["answer"] for line in lines]

    env = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    answered = subprocess.run(
        [python_without_lmmtune(tmp_path / "venv"), "-c", LOAD_AND_ANSWER, json.dumps(rows)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    answers = json.loads(answered.stdout.strip().splitlines()[-1])
    assert answers == lmmtune_answers and all(answers), (answers, lmmtune_answers)
