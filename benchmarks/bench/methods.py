"""`python -m benchmarks.bench --methods`: each PEFT method trained on the offline demo.

    python -m benchmarks.bench --methods                          # the demo as shipped
    python -m benchmarks.bench --methods --demo-size 80 --epochs 4

Every method (lora, dora, rslora, LoRA+ at ratio 16) runs `python -m lmmtune recipe=demo`
with the same data, seed and steps, each in its own process, and reports held-out accuracy
before and after, trainable parameters, the step time as a ratio of lora's (measured in
the same invocation) and the process's peak memory: resident set size on a CPU (what the
kernel reports for the whole process: weights, activations, Python), as the demo is a CPU
run. Absolute times only mean something on the machine they were measured on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {
    "lora": [],
    "dora": ["peft.method=dora"],
    "rslora": ["peft.method=rslora"],
    "loraplus": ["peft.loraplus_lr_ratio=16"],
}
"""Each method as the overrides that select it on top of recipe=demo."""
TRAINABLE = re.compile(r"trainable parameters: ([\d,]+) of")


def run_method(name: str, demo_size: int, epochs: int, workdir: Path) -> dict:
    """Train and evaluate the demo with method `name`; its row of the table."""
    overrides = [
        "recipe=demo",
        f"output_dir={workdir / name}",
        "tracking=none",
        f"data.demo_size={demo_size}",
        f"train.epochs={epochs}",
        *METHODS[name],
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmmtune", *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the largest so far
    if os.waitstatus_to_exitcode(status) != 0:
        return {"method": name, "status": f"failed: {stderr.strip().splitlines()[-1][:200]}"}
    metrics = json.loads((workdir / name / "metrics.json").read_text())
    train = metrics["train"]
    found = TRAINABLE.search(stderr)
    return {
        "method": name,
        "status": "ok",
        "overrides": " ".join(METHODS[name]) or "(defaults)",
        "accuracy_before": metrics.get("eval_before", {}).get("accuracy"),
        "accuracy_after": metrics.get("eval_after", {}).get("accuracy"),
        "trainable_params": int(found.group(1).replace(",", "")) if found else None,
        "steps": train["steps"],
        "step_seconds": train["summary"]["train_runtime"] / train["steps"],
        "final_loss": train["loss_history"][-1],
        "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,  # Linux reports KiB
    }


def compare_methods(names: list[str], demo_size: int, epochs: int) -> dict:
    """Every method in `names` (lora first: the baseline of the step-time ratio)."""
    names = ["lora", *[n for n in names if n != "lora"]]
    with tempfile.TemporaryDirectory(prefix="lmmtune-methods-") as tmp:
        rows = [run_method(name, demo_size, epochs, Path(tmp)) for name in names]
    baseline = rows[0].get("step_seconds")
    for row in rows:
        if row["status"] == "ok" and baseline:
            row["step_time_vs_lora"] = row["step_seconds"] / baseline
    return {"demo_size": demo_size, "epochs": epochs, "results": rows}


def methods_markdown(report: dict) -> str:
    """The table docs/peft_methods.md shows."""
    lines = [
        f"demo_size={report['demo_size']}, {report['epochs']} epochs, CPU; peak memory is the "
        "process's resident set size",
        "",
        "| method | accuracy before -> after | trainable params | steps | step time vs lora "
        "| peak RSS (GiB) | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | {row['status']} | | | | | |")
            continue
        lines.append(
            f"| {row['method']} | {_share(row['accuracy_before'])} -> "
            f"{_share(row['accuracy_after'])} | {row['trainable_params']:,} | {row['steps']} "
            f"| {row['step_time_vs_lora']:.2f}x | {row['peak_rss_gib']:.2f} "
            f"| {row['final_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
