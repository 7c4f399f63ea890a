"""The MLflow run description: what was trained on what, and how it came out.

MLflow shows the `mlflow.note.content` tag as the run's description (markdown) at the
top of the run page, so a person who opens a run reads the recipe, base model, data,
trainable parameters, key settings and the before/after numbers without digging
through a hundred params.
"""

from __future__ import annotations

from lmmtune import distributed
from lmmtune.eval.report import HEADLINE

NOTE_TAG = "mlflow.note.content"


def describe_run(tracker, cfg, train_cfg, metrics: dict, report) -> None:
    """Set (or refresh, as results come in) the run's description.

    `train_cfg` is the training setup actually used (the memory planner may change the batch).
    """
    tracker.set_tags({NOTE_TAG: run_description(cfg, train_cfg, metrics, report)})


def run_description(cfg, train_cfg, metrics: dict, report) -> str:
    """Markdown: a headline, then one bullet each for model, data, parameters, settings, results."""
    counts = metrics.get("data", {})
    lines = [
        f"**{cfg.name}**: QLoRA fine-tune of `{cfg.model.path}` on {_train_data(cfg.data)}",
        "",
        f"- **Base model**: `{cfg.model.path}`, quantization {_quant(cfg.quant)}",
        f"- **Data**: {_data(cfg.data, counts)}",
    ]
    if report is not None:
        lines.append(f"- **Trainable**: {str(report).removeprefix('trainable parameters: ')}")
    lines += [f"- **LoRA**: {_lora(cfg.peft)}", f"- **Training**: {_training(train_cfg)}"]
    losses = metrics.get("train", {}).get("loss_history") or []
    if losses:
        steps = metrics["train"].get("steps")
        lines.append(f"- **Loss**: {losses[0]:.3f} → {losses[-1]:.3f} over {steps} steps")
    outcome = _eval(metrics.get("eval_before"), metrics.get("eval_after"))
    if outcome:
        lines.append(f"- **Eval** ({counts.get('eval_samples', '?')} samples): {outcome}")
    return "\n".join(lines)


def _train_data(data_cfg) -> str:
    return "the synthetic demo set" if data_cfg.train == "demo" else f"`{data_cfg.train}`"


def _quant(quant_cfg) -> str:
    if quant_cfg.mode == "4bit":
        return f"4-bit {quant_cfg.quant_type} (compute {quant_cfg.compute_dtype})"
    return quant_cfg.mode


def _data(data_cfg, counts: dict) -> str:
    train = _train_data(data_cfg)
    source = f"`{data_cfg.eval}`" if data_cfg.eval else "held out from train"
    if data_cfg.train == "demo":
        source = "the demo's held-out scans"
    text = (
        f"train {train}, {counts.get('train_samples', '?')} samples; "
        f"eval {source}, {counts.get('eval_samples', '?')} samples"
    )
    if counts.get("skipped_records"):
        text += f"; {counts['skipped_records']} invalid records skipped"
    return text


def _lora(peft_cfg) -> str:
    parts = [
        f"r={peft_cfg.r}, alpha={peft_cfg.alpha}, dropout {peft_cfg.dropout}",
        "on " + ", ".join(peft_cfg.target_modules),
    ]
    if peft_cfg.train_projector:
        lr = peft_cfg.projector_lr
        parts.append("projector trained" + (f" (lr {lr:g})" if lr else ""))
    if peft_cfg.train_lm_head:
        parts.append("output head trained")
    return "; ".join(parts)


def _training(train_cfg) -> str:
    length = (
        f"{train_cfg.max_steps} steps"
        if train_cfg.max_steps > 0
        else f"{train_cfg.epochs:g} epochs"
    )
    processes = distributed.world_size()
    batch = train_cfg.batch_size * train_cfg.grad_accum * processes
    return (
        f"{length}, lr {train_cfg.learning_rate:g} {train_cfg.scheduler} "
        f"(warmup {train_cfg.warmup_ratio:g}), batch {train_cfg.batch_size} × "
        f"{train_cfg.grad_accum} accumulation × {processes} process{'es' if processes > 1 else ''} "
        f"= {batch}, "
        f"{train_cfg.optim}, seed {train_cfg.seed}"
    )


def _eval(before: dict | None, after: dict | None) -> str:
    shown = []
    for key in HEADLINE:
        old = (before or {}).get(key)
        new = (after or {}).get(key)
        if old is not None and new is not None:
            shown.append(f"{key} {old:.3f} → **{new:.3f}**")
        elif new is not None or old is not None:
            label = "after" if new is not None else "before"
            shown.append(f"{key} {new if new is not None else old:.3f} ({label})")
    return ", ".join(shown)
