"""Security: no remote code unless asked, safetensors only, secrets kept out of MLflow and configs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmmtune.config import Config, ModelConfig
from lmmtune.redact import redact, redact_value
from tests.conftest import run_cli

PACKAGE = Path(__file__).resolve().parent.parent / "lmmtune"


def test_remote_code_is_off_by_default_and_not_run(tmp_path, tiny_model_path):
    """A checkpoint's own processor code (auto_map) runs only with model.trust_remote_code=true."""
    import shutil

    from lmmtune.model import load_processor

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

    processor = load_processor(ModelConfig(path=str(model_dir)))
    assert type(processor).__name__ == "LlavaProcessor" and not marker.exists()
    with pytest.raises(AttributeError):  # the stub class is no processor, but its file ran
        load_processor(ModelConfig(path=str(model_dir), trust_remote_code=True))
    assert marker.exists()


MODEL_CLASSES = ("AutoModelForImageTextToText", "LlavaForConditionalGeneration", "AutoModel")


def from_pretrained_calls() -> list[tuple[str, ast.Call]]:
    """Every `<model class>.from_pretrained(...)` call in the package, with its file and line."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in MODEL_CLASSES
            ):
                calls.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", node))
    return calls


def test_every_model_load_asks_for_safetensors():
    calls = from_pretrained_calls()
    assert len(calls) >= 3  # training's loader, a finished run's merged model, MLflow's model
    for where, call in calls:
        safe = [k for k in call.keywords if k.arg == "use_safetensors"]
        assert safe and ast.literal_eval(safe[0].value) is True, f"{where}: no use_safetensors=True"


def test_no_pickle_loading_without_weights_only():
    """torch.load unpickles arbitrary objects unless weights_only=True; pickle itself always does."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            assert (owner, node.func.attr) not in {("pickle", "load"), ("pickle", "loads")}, where
            if (owner, node.func.attr) == ("torch", "load"):
                flags = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                assert flags.get("weights_only") is True, where


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
    from_env = {  # values a config takes with ${oc.env:NAME}
        "PGPASSWORD": "pg-Secret-1",
        "MYSQL_PWD": "my-Secret-2",
        "OPENAI_KEY": "sk-Secret-3",
        "SLACK_WEBHOOK_URL": "https://hooks.example/T0/B0/Secret-4",
        "DB_PASS": "db-Secret-5",
    }
    args = [
        "recipe=demo",
        "data.demo_size=12",
        "train.max_steps=2",
        "train.batch_size=4",
        "eval.before=false",
        "eval.after=false",
        "data.num_workers=0",
        f"tracking.run_name=run-{secret}-${{oc.env:PGPASSWORD}}-${{oc.env:SLACK_WEBHOOK_URL}}",
        "tracking.experiment=exp-${oc.env:DB_PASS}",
        "name=demo-${oc.env:OPENAI_KEY}",
        "eval.output=${oc.env:MYSQL_PWD}",
        "output_dir=run",
    ]
    env = {"HF_TOKEN": secret, "MLFLOW_TRACKING_PASSWORD": "pw-12345", **from_env}
    result = run_cli(args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    secrets = [secret, "pw-12345", *from_env.values()]
    saved = "".join(
        p.read_text(errors="ignore") for p in (tmp_path / "run").glob("*.*") if p.is_file()
    )
    printed = result.stdout + result.stderr
    assert [s for s in secrets if s in saved or s in printed] == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.name for e in client.search_experiments()]
    assert "exp-***" in experiments and not any("Secret" in name for name in experiments)
    run = client.search_runs([client.get_experiment_by_name("exp-***").experiment_id])[0]
    everything = json.dumps({**run.data.params, **run.data.tags, "name": run.info.run_name})
    assert [s for s in secrets if s in everything] == []
    assert run.data.params["tracking.run_name"] == "run-***-***-***"
    assert run.data.params["name"] == "demo-***" and run.data.params["eval.output"] == "***"
