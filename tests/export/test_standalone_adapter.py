"""The run's own `adapter/` stands alone: loaded as its model card says, with plain peft and
transformers, it answers the demo's eval questions as well as lmmtune measured."""

from __future__ import annotations

import json
import re

import torch
import yaml
from PIL import Image

from lmmtune.eval.metrics import score_predictions


def card_parts(adapter_dir):
    card = (adapter_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return card, front, blocks


def test_model_card_is_filled_not_peft_template(demo_run):
    card, front, blocks = card_parts(demo_run["run_dir"] / "adapter")
    assert "More Information Needed" not in card
    assert "base_model" not in front  # `tiny` is no hub id; never a local cache path
    assert ".cache" not in card
    assert front["library_name"] == "peft" and "lmmtune" in front["tags"]
    metrics = json.loads((demo_run["run_dir"] / "metrics.json").read_text())
    before, after = metrics["eval_before"]["accuracy"], metrics["eval_after"]["accuracy"]
    assert f"| accuracy | {before:.3f} | {after:.3f} |" in card
    assert "synthetic demo set" in card and "r=16, alpha=32" in card
    assert len(blocks[0].strip().splitlines()) == 3  # loading it takes three lines


def test_model_card_names_a_hub_base_model():
    from lmmtune.eval.description import front_matter, how_to_load

    assert front_matter("llava-hf/llava-1.5-7b-hf")["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert '"llava-hf/llava-1.5-7b-hf"' in how_to_load("llava-hf/llava-1.5-7b-hf")


def test_run_adapter_loaded_with_plain_peft_scores_as_lmmtune(demo_run):
    """As the card says: its three lines, then its generation code, on the demo's eval set."""
    adapter_dir = demo_run["run_dir"] / "adapter"
    _, _, blocks = card_parts(adapter_dir)
    base = json.loads((adapter_dir / "lmmtune_base.json").read_text())["base_model"]
    loading = blocks[0].replace("PATH/TO/THIS/FOLDER", str(adapter_dir))
    namespace: dict = {}
    exec(loading.replace("PATH/TO/BASE/MODEL", base), namespace)  # noqa: S102 - the card's code
    processor, model = namespace["processor"], namespace["model"].eval()
    assert processor.image_processor.do_pad and processor.chat_template

    data_dir = demo_run["run_dir"] / "demo_data"
    records = json.loads((data_dir / "eval.json").read_text())
    predictions = []
    for record in records:
        image = Image.open(data_dir / record["image"]).convert("RGB")
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
            }
        ]
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = output[0, inputs["input_ids"].shape[1] :]
        predictions.append(processor.decode(answer, skip_special_tokens=True))
    references = [record["conversations"][1]["value"] for record in records]
    metrics, _ = score_predictions(predictions, references, ["closed"] * len(records))
    lmmtune = json.loads((demo_run["run_dir"] / "metrics.json").read_text())["eval_after"]
    assert metrics["samples"] == lmmtune["samples"] == 128
    assert metrics["accuracy"] == lmmtune["accuracy"]  # 119/128 with a centre-cropping processor
