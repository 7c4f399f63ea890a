"""A DoRA run end to end on the tiny demo (train -> eval -> export merged with fp32 parity ->
predict, its adapter/ loaded by plain peft, DPO from it), and a LoRA+ run resumed after kill -9
ending with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_cli
from tests.test_reliability import FAST, adapter_weights, start_cli, wait_for_checkpoint

DORA_RUN = [
    "recipe=demo",
    "output_dir=run",
    "peft.method=dora",
    "data.demo_size=40",
    "train.epochs=3",
    "train.batch_size=4",
    "eval.before=false",
]
PLAIN_PEFT = """
import json, sys
from peft import PeftModel
from transformers import LlavaForConditionalGeneration
base = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2])
print(json.dumps({"use_dora": model.peft_config["default"].use_dora,
                  "magnitudes": sum("lora_magnitude_vector" in n for n, _ in model.named_parameters())}))
"""


def cli_ok(args: list[str], cwd) -> subprocess.CompletedProcess:
    result = run_cli(args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # five CLI processes on the tiny demo
@pytest.mark.heavy  # not in CI
def test_a_dora_run_trains_evaluates_exports_with_parity_and_predicts(tmp_path):
    from lmmtune.demo import tiny_model_dir

    cli_ok(DORA_RUN, tmp_path)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["train"]["loss_history"]
    assert history[-1] < history[0] / 4, history
    settings = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert settings["use_dora"] is True and settings["use_rslora"] is False

    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(tiny_model_dir()), str(run / "adapter")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    loaded = json.loads(plain.stdout.splitlines()[-1])
    assert loaded["use_dora"] and loaded["magnitudes"] > 0

    cli_ok(["eval", "output_dir=run", "tracking=none"], tmp_path)
    again = json.loads((run / "eval" / "metrics.json").read_text())["eval_after"]
    assert again["exact_match"] == metrics["eval_after"]["exact_match"]  # DoRA read back, not LoRA
    cli_ok(["export", "output_dir=run", "tracking=none", "export.dtype=float32",
            "export.parity_samples=4"], tmp_path)  # fmt: skip
    report = json.loads((run / "export-merged" / "export_report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["argmax_agreement"] == 1.0

    first = json.loads((run / "demo_data" / "eval.json").read_text())[0]
    text = first["conversations"][0]["value"].replace("<image>", "").strip()
    question = [f"predict.question='{text}'", f"predict.image={run / 'demo_data' / first['image']}"]
    merged = cli_ok(["predict", "output_dir=run", "tracking=none", "predict.max_new_tokens=3",
                     f"predict.model={run / 'export-merged'}", *question], tmp_path)  # fmt: skip
    adapter = cli_ok(["predict", "output_dir=run", "tracking=none", "predict.max_new_tokens=3",
                      *question], tmp_path)  # fmt: skip
    assert merged.stdout.strip() and merged.stdout == adapter.stdout  # the export answers alike


@pytest.mark.slow  # three CLI processes, one killed
@pytest.mark.heavy  # not in CI
def test_a_loraplus_dora_run_resumed_after_kill_9_matches_an_uninterrupted_one(tmp_path):
    args = [*FAST, "peft.method=dora", "peft.loraplus_lr_ratio=4", "train.max_steps=16"]
    cli_ok([*args, "output_dir=straight"], tmp_path)

    process = start_cli([*args, "output_dir=crashed"], cwd=tmp_path)
    first = wait_for_checkpoint(tmp_path / "crashed", process, min_step=8)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "crashed" / "metrics.json").exists(), "the run finished before the kill"

    resumed = cli_ok([*args, "output_dir=crashed", "train.resume=auto"], tmp_path)
    assert "resuming from" in resumed.stderr and first.name in resumed.stderr
    expected, got = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "crashed")
    assert expected.keys() == got.keys() and any("magnitude" in key for key in expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
