"""Security: no remote code unless asked, safetensors only, secrets kept out of MLflow and configs."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmmtune.config import Config
from lmmtune.track.redact import redact, redact_value

from .conftest import run_cli

PACKAGE = Path(__file__).resolve().parent.parent / "lmmtune"


def test_remote_code_is_off_by_default_and_not_run(tmp_path, tiny_model_path):
    import shutil

    from transformers import AutoProcessor

    assert Config().model.trust_remote_code is False
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_path, model_dir)
    marker = tmp_path / "remote_code_ran"
    (model_dir / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass EvilProcessor: ...\n"
    )
    processor_config = json.loads((model_dir / "processor_config.json").read_text())
    processor_config["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    (model_dir / "processor_config.json").write_text(json.dumps(processor_config))
    with contextlib.suppress(Exception):  # refusing is fine too; running the code is not
        AutoProcessor.from_pretrained(model_dir, trust_remote_code=Config().model.trust_remote_code)
    assert not marker.exists()


def test_weights_load_from_safetensors_and_pickles_only_with_weights_only():
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    loaders = [
        path
        for path, text in sources.items()
        if "from_pretrained(" in text and "LlavaForConditionalGeneration" in text
    ]
    assert any("use_safetensors=True" in sources[path] for path in loaders)
    for path, text in sources.items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_redaction_of_secret_keys_uri_passwords_and_env_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_TopSecretValue123")
    clean = redact(
        {
            "tracking.tracking_uri": "http://alice:s3cret@mlflow.example:5000",
            "hub_token": "anything",
            "eval.max_new_tokens": 32,
            "tracking.run_name": "run-hf_TopSecretValue123",
            "nested": {"api_key": "k", "path": "/data"},
        }
    )
    assert clean["tracking.tracking_uri"] == "http://***@mlflow.example:5000"
    assert clean["hub_token"] == "***" and clean["eval.max_new_tokens"] == 32
    assert clean["tracking.run_name"] == "run-***"
    assert clean["nested"] == {"api_key": "***", "path": "/data"}
    assert redact_value("no secrets here") == "no secrets here"


def test_secrets_never_reach_mlflow_or_the_saved_config(tmp_path):
    secret = "hf_SuperSecretToken987"
    args = [
        "recipe=demo",
        "data.demo_size=12",
        "train.max_steps=2",
        "train.batch_size=4",
        "eval.before=false",
        "eval.after=false",
        "data.num_workers=0",
        f"tracking.run_name=run-{secret}",
        "output_dir=run",
    ]
    result = run_cli(
        args, cwd=tmp_path, env={"HF_TOKEN": secret, "MLFLOW_TRACKING_PASSWORD": "pw-12345"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = "".join(
        p.read_text(errors="ignore") for p in (tmp_path / "run").glob("*.*") if p.is_file()
    )
    assert secret not in saved and "pw-12345" not in saved
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("demo").experiment_id])[0]
    everything = json.dumps({**run.data.params, **run.data.tags, "name": run.info.run_name})
    assert secret not in everything and "pw-12345" not in everything
    assert run.data.params["tracking.run_name"] == "run-***"
