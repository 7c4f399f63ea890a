"""A run's `adapter/` that stands alone: the export processor and a filled model card.

peft's `save_pretrained` writes a blank model-card template naming the local cache path
as `base_model`; this replaces it with what a reader needs: the base model's id, the
data, the numbers before and after training, and how to load the adapter with plain
peft and transformers. The processor the training saves beside it is the export's
(`lmmtune.export.chat_template.export_processor`: pad-to-square image processing and the
Vicuna v1 chat template), so `AutoProcessor` gives what training saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmmtune.eval.description import run_description
from lmmtune.eval.report import HEADLINE
from lmmtune.weights import hub_id_of

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
