"""Secret shapes masked, innocent names and metric values kept, no password on MLflow's console."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lmmtune.redact import MASK, is_secret_name, redact, redact_value
from tests.track.test_mlflow_ui import mlflow_ui

SECRET_NAMES = [
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "hf_token",
    "hf-token",
    "hfToken",
    "HuggingFaceToken",
    "access_token",
    "MLFLOW_TRACKING_PASSWORD",
    "DB_PASSWD",
    "db.password",
    "OPENAI_API_KEY",
    "openai-api-key",
    "apiKey",
    "AWS_SECRET_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GITHUB_PAT",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "private_key",
    "client_secret",
    "MLFLOW_TRACKING_AUTH",
]
INNOCENT_NAMES = [
    "max_new_tokens",
    "tokenizer",
    "token_f1",
    "eval_after/token_f1",
    "num_tokens",
    "author",
    "auth_type",
    "keep_best",
    "path",
    "PWD",
    "patience",
    "signal",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names_in_every_naming_style(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", INNOCENT_NAMES)
def test_innocent_names_are_not_secrets(name):
    assert not is_secret_name(name)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("http://alice:s3cret@mlflow.example:5000", "s3cret"),
        ("https://alice:pa/ss@mlflow.example/path", "pa/ss"),
        ("https://alice:p@ss@mlflow.example", "p@ss"),
        ("https://ghp_abcdefTOKEN@mlflow.example", "ghp_abcdefTOKEN"),
        ("postgresql://mlflow:dbpw99@db:5432/mlflow", "dbpw99"),
        ("https://mlflow.example/api?token=tok123&x=1", "tok123"),
        ("https://store.example/f?sig=abcsig&se=2030", "abcsig"),
        ("https://mlflow.example/?api_key=key987", "key987"),
        ("tracking.tracking_uri=http://u:pw42@h:5000", "pw42"),
        ("tracking.password=plainpw", "plainpw"),
        ("View run x at: http://u:consolepw@h:5000/#/experiments/1", "consolepw"),
    ],
)
def test_secret_shapes_in_text_are_masked(text, secret):
    clean = redact_value(text, secrets=[])
    assert secret not in clean and MASK in clean


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:///runs/mlflow.db",
        "file:///home/user/mlruns",
        "sqlite:////tmp/a@b/mlflow.db",
        "https://mlflow.example:5000/#/experiments/1?searchFilter=x",
        "eval.max_new_tokens=32",
        "peft.r=16",
    ],
)
def test_text_without_secrets_is_unchanged(text):
    assert redact_value(text, secrets=[]) == text


def test_metric_values_are_never_masked(tmp_path):
    from lmmtune.track.record import LocalRecord

    metrics = {"eval_after/token_f1": 0.75, "token_f1": 0.5, "train/loss": 1.0}
    assert redact(metrics) == metrics
    record = LocalRecord(tmp_path)
    record.append("log_metrics", (metrics,), {"step": 3})
    assert record.events()[0]["args"][0] == metrics


def test_multirun_file_is_masked(tmp_path):
    from lmmtune.track.sweep import mask_multirun_file, sweep_description

    (tmp_path / "multirun.yaml").write_text(
        "tracking:\n  tracking_uri: http://u:filepw@h:5000\n"
        "hydra:\n  overrides:\n    task:\n    - tracking.tracking_uri=http://u:filepw@h:5000\n"
        "    - peft.r=16,64\n"
    )
    mask_multirun_file(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    text = (tmp_path / "multirun.yaml").read_text()
    assert "filepw" not in text and "peft.r=16,64" in text
    overrides = [redact_value("tracking.tracking_uri=http://u:descpw@h"), "peft.r=16,64"]
    assert "descpw" not in sweep_description("demo", overrides, ["peft.r"])


def test_mlflow_console_lines_hold_no_password(tmp_path, capfd):
    from lmmtune.config import TrackingConfig
    from lmmtune.track.mlflow_tracker import MlflowTracker

    with mlflow_ui(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, tmp_path / "server.log") as url:
        host = url.removeprefix("http://")
        uri = f"http://alice:consolepw99@{host}"
        tracker = MlflowTracker(TrackingConfig(tracking_uri=uri), "secrets", "run")
        tracker.log_metrics({"eval/token_f1": 0.5}, step=1)
        tracker.end("FINISHED")
        out, err = capfd.readouterr()
        assert "consolepw99" not in out + err
        run = MlflowClient(url).get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["eval/token_f1"] == 0.5
