"""What MLflow and the adapter folder say about a run: the run description and the model card.

The MLflow run description: what was trained on what, and how it came out.

MLflow shows the `mlflow.note.content` tag as the run's description (markdown) at the
top of the run page, so a person who opens a run reads the recipe, base model, data,
trainable parameters, key settings and the before/after numbers without digging
through a hundred params.

A run's `adapter/` that stands alone: the export processor and a filled model card.

peft's `save_pretrained` writes a blank model-card template naming the local cache path
as `base_model`; this replaces it with what a reader needs: the base model's id, the
data, the numbers before and after training, and how to load the adapter with plain
peft and transformers. The processor the training saves beside it is the export's
(`lmmtune.export.processor.export_processor`: pad-to-square image processing and the
Vicuna v1 chat template), so `AutoProcessor` gives what training saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmmtune import distributed
from lmmtune.eval.report import HEADLINE
from lmmtune.rundir.files import hub_id_of

NOTE_TAG = "mlflow.note.content"


def describe_run(tracker, cfg, train_cfg, metrics: dict, report) -> None:
    """Set (or refresh, as results come in) the run's description.

    `train_cfg` is the training setup actually used (the memory planner may change the batch).
    """
    tracker.set_tags({NOTE_TAG: run_description(cfg, train_cfg, metrics, report)})


def run_description(cfg, train_cfg, metrics: dict, report) -> str:
    """Markdown: a headline, then one bullet each for model, data, parameters, settings, results."""
    counts = metrics.get("data", {})
    align = getattr(cfg, "stage", "sft") == "align"  # stage 1: the projector alone, no LoRA
    what = "projector alignment (stage 1)" if align else "QLoRA fine-tune"
    lines = [
        f"**{cfg.name}**: {what} of `{cfg.model.path}` on {_train_data(cfg.data)}",
        "",
        f"- **Base model**: `{cfg.model.path}`, quantization {_quant(cfg.quant)}"
        + _projector(cfg.model),
        f"- **Data**: {_data(cfg.data, counts)}",
    ]
    if report is not None:
        lines.append(f"- **Trainable**: {str(report).removeprefix('trainable parameters: ')}")
    lora = "none: the projector alone trains" if align else _lora(cfg.peft)
    lines += [f"- **LoRA**: {lora}", f"- **Training**: {_training(train_cfg)}"]
    losses = metrics.get("train", {}).get("loss_history") or []
    if losses:
        steps = metrics["train"].get("steps")
        lines.append(f"- **Loss**: {losses[0]:.3f} → {losses[-1]:.3f} over {steps} steps")
    outcome = _eval(metrics.get("eval_before"), metrics.get("eval_after"))
    if outcome:
        lines.append(f"- **Eval** ({counts.get('eval_samples', '?')} samples): {outcome}")
    return "\n".join(lines)


def _projector(model_cfg) -> str:
    """The aligned projector stage 2 started from (its file name only: no home directory)."""
    if not model_cfg.get("projector"):
        return ""
    sha = model_cfg.get("projector_sha256") or ""
    return f"; aligned projector `{Path(model_cfg.projector).name}` (sha256 {sha[:12]})"


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


CARD_FILE = "README.md"


def write_model_card(adapter_dir: Path, cfg, train_cfg, metrics: dict, report) -> Path:
    """Write `adapter_dir/README.md`: front matter, what was trained, metrics, how to load it."""
    base = cfg.model.path
    sections = [
        "---\n" + yaml.safe_dump(front_matter(base), sort_keys=False) + "---",
        f"# {cfg.name}: LoRA adapter for `{base}`",
        run_description(cfg, train_cfg, metrics, report),
        metrics_table(metrics.get("eval_before"), metrics.get("eval_after")),
        how_to_load(base),
    ]
    path = adapter_dir / CARD_FILE
    path.write_text("\n\n".join(s for s in sections if s) + "\n", encoding="utf-8")
    return path


def front_matter(base: str) -> dict:
    """Hub metadata; `base_model` only when it is a hub id (not a local folder or `tiny`)."""
    matter: dict = {"library_name": "peft", "pipeline_tag": "image-text-to-text"}
    if hub_id_of(base):
        matter["base_model"] = base
    matter["tags"] = ["lmmtune", "llava", "lora", "qlora"]
    return matter


def metrics_table(before: dict | None, after: dict | None) -> str:
    """A markdown table of the headline eval metrics before and after training."""
    names = [name for name in HEADLINE if name in {**(before or {}), **(after or {})}]
    if not names:
        return ""
    samples = int((after or before or {}).get("samples", 0))
    lines = [
        f"## Evaluation ({samples} held-out samples)",
        "",
        "| metric | before training | after training |",
        "|---|---|---|",
    ]
    for name in names:
        cells = [_cell(result, name) for result in (before, after)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _cell(result: dict | None, name: str) -> str:
    value = (result or {}).get(name)
    return "–" if value is None else f"{value:.3f}"


def how_to_load(base: str) -> str:
    """Three lines with plain peft and transformers, then one question asked."""
    base_ref = json.dumps(hub_id_of(base) or "PATH/TO/BASE/MODEL")
    note = (
        ""
        if hub_id_of(base)
        else f"\n`{base}` is a local base model; `lmmtune_base.json` names the folder trained on.\n"
    )
    return f"""## How to load it

```python
from peft import PeftModel; from transformers import AutoModelForImageTextToText, AutoProcessor
processor = AutoProcessor.from_pretrained("PATH/TO/THIS/FOLDER")  # pads to square, Vicuna v1 prompt
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained({base_ref}), "PATH/TO/THIS/FOLDER")
```
{note}
Ask a question (greedy decoding, as lmmtune evaluates):

```python
from PIL import Image
image = Image.open("IMAGE.png").convert("RGB")
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": "QUESTION"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:]
print(processor.decode(answer, skip_special_tokens=True))
```

The projector trained with the adapter is saved inside it (peft `modules_to_save`), so
the three lines above load everything training changed."""
