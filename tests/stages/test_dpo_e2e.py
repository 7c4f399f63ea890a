"""`recipe=demo_dpo` on top of the SFT demo, through the CLI: DPO moves held-out preference,
keeps generation accuracy, is tracked with its SFT parent, and exports, predicts and chats like SFT."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lmmtune.commands import predict
from tests.conftest import compose_config, run_cli

# A DPO run on top of the SFT demo (about two minutes): CI's slow step runs it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(demo_run, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("dpo")
    adapter = demo_run["run_dir"] / "adapter"
    result = run_cli(
        ["recipe=demo_dpo", f"dpo.init_adapter={adapter}", "output_dir=run"], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = workdir / "run"
    return {
        "workdir": workdir,
        "run_dir": run_dir,
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "tracking_uri": f"sqlite:///{workdir}/mlflow.db",
        "sft_run_id": json.loads((demo_run["run_dir"] / "tracking.json").read_text())["run_id"],
    }


def test_dpo_raises_held_out_preference_and_keeps_generation_accuracy(dpo_run):
    metrics = dpo_run["metrics"]
    before, after = metrics["preference_before"], metrics["preference_after"]
    # The reference is the SFT model itself: every held-out margin is the DPO stage's.
    assert before["rewards/accuracies"] <= 0.1 and abs(before["rewards/margins"]) < 1e-3
    assert after["rewards/accuracies"] >= 0.9
    assert after["rewards/margins"] > 0
    # the model's own log-prob margin (chosen minus rejected) on pairs it never trained on
    assert after["logp_margin"] > before["logp_margin"] + 0.5
    assert metrics["eval_after"]["accuracy"] >= metrics["eval_before"]["accuracy"]
    assert metrics["eval_before"]["accuracy"] >= 0.9  # it started from the trained SFT adapter


def test_dpo_run_is_tracked_with_rewards_and_its_sft_parent(dpo_run):
    client = MlflowClient(tracking_uri=dpo_run["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("demo_dpo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "dpo" and run.data.tags["dpo_start"] == "adapter"
    assert run.data.tags["sft_parent_run_id"] == dpo_run["sft_run_id"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert len(client.get_metric_history(run.info.run_id, f"train/{name}")) >= 4, name
    held_out = client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")
    assert [m.value for m in held_out][-1] >= 0.9 > [m.value for m in held_out][0]
    tags = run.data.tags  # per-run numbers are tags (no one-bar charts)
    assert float(tags["eval_after/accuracy"]) >= float(tags["eval_before/accuracy"])


def test_dpo_adapter_has_no_reference_copy_and_exports_and_predicts(dpo_run, capsys):
    adapter = dpo_run["run_dir"] / "adapter"
    assert not (adapter / "ref").exists()  # the frozen reference copy is not saved
    result = run_cli(["export", "output_dir=run", "tracking.backend=none"], cwd=dpo_run["workdir"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((dpo_run["run_dir"] / "export-merged" / "export_report.json").read_text())
    assert report["parity"]["passed"]
    rows = [
        json.loads(line)
        for line in (dpo_run["run_dir"] / "eval_predictions.jsonl").read_text().splitlines()
    ]
    row = rows[0]
    cfg = compose_config(
        [
            f"output_dir={dpo_run['run_dir']}",
            f"predict.image={row['image']}",
            f"predict.question={row['question']}",
            "predict.max_new_tokens=3",
        ]
    )
    (answer,) = predict(cfg, overrides=[])
    assert answer["answer"] == row["after"]


def test_chat_serves_the_dpo_run_base_and_adapted(dpo_run, demo_run):
    """The chat app on a DPO run directory: the adapted answer is the DPO run's "after"; the base
    answer (adapter off) is the base model's, i.e. the SFT run's "before" (the DPO run's own
    "before" is the SFT adapter's answer)."""
    from lmmtune.chat.answer import Answerer, Settings, conversation, load_chat_model

    run_dir = dpo_run["run_dir"]
    row = json.loads((run_dir / "eval_predictions.jsonl").read_text().splitlines()[0])
    sft_rows = (demo_run["run_dir"] / "eval_predictions.jsonl").read_text().splitlines()
    (sft_row,) = [r for r in map(json.loads, sft_rows) if r["id"] == row["id"]]
    assert sft_row["question"] == row["question"]

    chat_model = load_chat_model(
        compose_config([f"output_dir={run_dir}", "chat.examples=0"]), overrides=[]
    )
    assert chat_model.has_base and str(run_dir / "adapter") in chat_model.description
    answerer = Answerer(chat_model)
    sample = conversation(
        row["image"], [], row["question"], answerer.tokenizer, chat_model.max_length
    )
    settings = Settings(OmegaConf.load(run_dir / "config.yaml").eval.max_new_tokens)
    *_, base = answerer.stream(answerer.inputs(sample), settings, adapter=False)
    *_, adapted = answerer.stream(answerer.inputs(sample), settings)
    assert adapted == row["after"]
    assert base == sft_row["before"] != adapted
