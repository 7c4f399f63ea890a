"""Secret shapes masked, innocent names and metric values kept, no password on MLflow's console."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lmmtune.redact import MASK, is_secret_name, redact, redact_value
from tests.tracking.test_mlflow_ui import mlflow_ui

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
    "PGPASSWORD",
    "MYSQL_PWD",
    "OPENAI_KEY",
    "SLACK_WEBHOOK_URL",
    "DB_PASS",
    "SMTP_PASSPHRASE",
    "db.passwd",
    "stripeKey",
    "DISCORD_WEBHOOK",
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
    "OLDPWD",
    "num_passes",
    "passthrough",
    "bypass_cache",
    "monkey",
    "key",
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
        # Hydra's launcher line escapes the colons of an override's value
        (r"#1 : peft.r=16 tracking.tracking_uri=http\://bob\:launchpw@h\:5999", "launchpw"),
        (r"#0 : peft.r=8 +db_password=wordpw output_dir=x", "wordpw"),
        (r"https://h/a?token\=escapedtok", "escapedtok"),
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


def test_no_setting_of_lmmtune_is_named_like_a_secret():
    """Every key of the schema keeps its value in MLflow params and the saved config."""
    from lmmtune.config import Config
    from lmmtune.tracking.mlflow_run import flatten

    keys = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    assert len(keys) > 100
    assert [key for key in keys if is_secret_name(key.rsplit(".", 1)[-1])] == []


def test_values_of_secret_variables_are_masked_also_as_hydra_escapes_them(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "pg:pw,99")
    line = r"#0 : tracking.tracking_uri=postgresql\://u@db/x?password\=pg\:pw\,99"
    assert "pw" not in redact_value(line).replace("password", "")
    assert redact_value("pg:pw,99 used") == f"{MASK} used"


def test_log_lines_of_any_logger_are_masked(monkeypatch):
    import io
    import logging

    from lmmtune.redact import RedactingFilter

    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.example/T0/B0/hooksecret")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("hydra._internal.core_plugins.basic_launcher")
    logger.addHandler(handler)
    try:
        logger.warning("\t#%d : %s", 1, r"tracking.tracking_uri=http\://bob\:PW42@h\:5999")
        logger.warning("posting to %s", "https://hooks.example/T0/B0/hooksecret")
    finally:
        logger.removeHandler(handler)
    printed = out.getvalue()
    assert "PW42" not in printed and "hooksecret" not in printed
    assert printed.count(MASK) == 2


def test_metric_values_are_never_masked(tmp_path):
    from lmmtune.tracking.tracker import LocalRecord

    metrics = {"eval_after/token_f1": 0.75, "token_f1": 0.5, "train/loss": 1.0}
    assert redact(metrics) == metrics
    record = LocalRecord(tmp_path)
    record.append("log_metrics", (metrics,), {"step": 3})
    assert record.events()[0]["args"][0] == metrics


def test_multirun_file_is_masked(tmp_path):
    from lmmtune.tracking.sweep import mask_multirun_file, sweep_description

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
    from lmmtune.tracking.tracker import Tracker

    with mlflow_ui(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, tmp_path / "server.log") as url:
        host = url.removeprefix("http://")
        uri = f"http://alice:consolepw99@{host}"
        tracker = Tracker()
        tracker.start_run(TrackingConfig(tracking_uri=uri), "secrets", "run")
        tracker.log_metrics({"eval/token_f1": 0.5}, step=1)
        tracker.end("FINISHED")
        out, err = capfd.readouterr()
        assert "consolepw99" not in out + err
        run = MlflowClient(url).get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["eval/token_f1"] == 0.5


def test_a_sweeps_launcher_line_holds_no_password(tmp_path):
    """Hydra prints each job's overrides (`#1 : ...`), escaping the URL's colons past the mask."""
    from tests.conftest import run_cli

    data = tmp_path / "small.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    result = run_cli(
        ["check", "-m", "recipe=demo", f"data.train={data}", f"data.eval={data}"]
        + ["peft.r=8,16", "tracking=none", "output_dir=sweep"]
        + ["tracking.tracking_uri=http://bob:sweeppw77@127.0.0.1:5999"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "#1 : " in printed and r"http\://***@127.0.0.1" in printed
    assert "sweeppw77" not in printed
