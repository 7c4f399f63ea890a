"""LLaVA-1.5-7B's real shapes, end to end through the plain CLI, on a CPU.

Builds a llava-hf-layout checkpoint at LLaVA-1.5-7B *width* (hidden 4096, 32 heads,
MLP 11008, vocabulary 32064, CLIP ViT-L/14-336 at full width, 576 image tokens) with
reduced depth and random weights, plus the real Llama-2 tokenizer
(`benchmarks.llama_tokenizer`), and runs what a user runs:

    check -> train (4-bit, LoRA r=128 + projector, a few steps) -> eval -> export
    (parity) -> load the export with plain transformers and generate

Each command's peak RSS and wall time, the 4-bit bytes of one decoder layer against
`lmmtune.training.memory`'s model of them, and the step time per layer go to a JSON report.

    python benchmarks/real_shapes.py --out /tmp/real-shapes [--text-layers 2 --vision-layers 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    ("Is there a lesion in this scan?", "yes"),
    ("Which side is the lesion on?", "left"),
    ("Is the scan normal?", "no"),
    ("What is shown in the image?", "A chest X-ray with a small nodule."),
]


def build_checkpoint(folder: Path, text_layers: int, vision_layers: int) -> Path:
    """Random bf16 weights at 7B width, reduced depth, with llava-hf's processor files."""
    import torch

    from benchmarks.bench.models import llava_config, write_random_checkpoint
    from benchmarks.llama_tokenizer import llama2_processor_dir

    config = llava_config("7b")
    config.text_config.num_hidden_layers = text_layers
    config.vision_config.num_hidden_layers = vision_layers
    target = folder / "llava-7b-width"
    if not (target / "config.json").exists():
        write_random_checkpoint(config, target, torch.bfloat16)
    for file in llama2_processor_dir(legacy=False).iterdir():
        shutil.copy(file, target / file.name)
    return target


def write_data(folder: Path) -> tuple[Path, Path]:
    """A few LLaVA records with images of odd sizes, split into train and eval files."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(6):
        name = f"images/{index}.png"
        Image.effect_noise((400 + 37 * index, 300), 40).convert("RGB").save(folder / name)
        question, answer = QUESTIONS[index % len(QUESTIONS)]
        conversations = [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ]
        records.append({"id": str(index), "image": name, "conversations": conversations})
    train, evaluation = folder / "train.json", folder / "eval.json"
    train.write_text(json.dumps(records[:4]))
    evaluation.write_text(json.dumps(records[4:]))
    return train, evaluation


def run(command: list[str], cwd: Path) -> dict:
    """Run a command under /usr/bin/time: its peak RSS, wall time and output."""
    timed = ["/usr/bin/time", "-f", "MAXRSS_KB=%M"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    done = subprocess.run([*timed, *command], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    rss = re.findall(r"MAXRSS_KB=(\d+)", done.stderr)
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(int(rss[-1]) / 2**20, 2) if rss else None,
        "stdout": done.stdout,
        "stderr": done.stderr,
    }


def cli_runs(checkpoint: Path, folder: Path, steps: int) -> dict:
    train, evaluation = write_data(folder)
    common = [f"model.path={checkpoint}", "output_dir=run", "tracking=none"]
    data = [f"data.train={train}", f"data.eval={evaluation}", "data.num_workers=0"]
    cli = [sys.executable, "-m", "lmmtune"]
    runs = {"check": run([*cli, "check", "recipe=medical", *common, *data], folder)}
    runs["train"] = run(
        [
            *cli,
            "train",
            "recipe=medical",
            *common,
            *data,
            f"train.max_steps={steps}",
            "train.batch_size=1",
            "train.grad_accum=1",
            "train.logging_steps=1",
            "eval.before=false",
            "eval.max_new_tokens=2",
        ],
        folder,
    )
    runs["eval"] = run([*cli, "eval", *common, "eval.max_new_tokens=2"], folder)
    # float32: a few steps leave LoRA deltas below bf16's resolution at weights of ~0.02,
    # and a bf16 merge rounds them away (measured: parity 0.13 of the logit scale).
    export = ["export", *common, "export.parity_samples=2", "export.dtype=float32"]
    runs["export"] = run([*cli, *export], folder)
    runs["plain_transformers"] = run(
        [sys.executable, __file__, "--load-export", str(folder / "run" / "export-merged")], folder
    )
    return runs


def load_export(export_dir: Path) -> None:
    """Load the merged export with transformers alone and answer one question."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(export_dir)
    model = AutoModelForImageTextToText.from_pretrained(export_dir, dtype="auto")
    image = Image.effect_noise((500, 300), 40).convert("RGB")
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTIONS[0][0]}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    print(
        json.dumps(
            {
                "image_tokens": image_tokens,
                "new_tokens": output.shape[1] - inputs["input_ids"].shape[1],
            }
        )
    )


def layer_weight_bytes(checkpoint: Path) -> dict:
    """Bytes of one 4-bit decoder layer (packed weights + block constants) vs memory.py's model."""
    from lmmtune.config import ModelConfig, QuantConfig
    from lmmtune.model import load_model
    from lmmtune.training.memory import NF4_BITS, ModelShape

    model = load_model(ModelConfig(path=str(checkpoint), dtype="bfloat16"), QuantConfig())
    layer = model.model.language_model.layers[0]
    measured = 0
    for module in layer.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None:
            continue
        measured += weight.numel() * weight.element_size() + _state_bytes(state)
    shape = ModelShape.from_config(model.config)
    modelled = shape.llm_linear_params() / shape.layers * NF4_BITS[True] / 8
    return {
        "measured_bytes": measured,
        "modelled_bytes": round(modelled),
        "measured_over_modelled": round(measured / modelled, 4),
        "bf16_bytes": shape.llm_linear_params() // shape.layers * 2,
    }


def _state_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size()
    if state.nested and state.state2 is not None:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        total += state.state2.code.numel() * state.state2.code.element_size()
    return total + state.code.numel() * state.code.element_size()


def step_seconds(run_dir: Path, steps: int) -> float | None:
    """The Trainer's runtime per step, from the run's metrics.json (its closing summary)."""
    summary = json.loads((run_dir / "metrics.json").read_text())["train"].get("summary", {})
    runtime = summary.get("train_runtime")
    return round(float(runtime) / steps, 2) if runtime else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("real-shapes"))
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--load-export", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_export:
        return load_export(args.load_export)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / "run", ignore_errors=True)
    checkpoint = build_checkpoint(args.out, args.text_layers, args.vision_layers)
    runs = cli_runs(checkpoint, args.out, args.steps)
    step = step_seconds(args.out / "run", args.steps)
    report = {
        "text_layers": args.text_layers,
        "vision_layers": args.vision_layers,
        "steps": args.steps,
        "commands": {
            name: {k: v for k, v in result.items() if k in ("seconds", "peak_rss_gib")}
            for name, result in runs.items()
        },
        "step_seconds": step,
        "step_seconds_per_text_layer": round(step / args.text_layers, 2) if step else None,
        "plain_transformers": json.loads(runs["plain_transformers"]["stdout"].splitlines()[-1]),
        "export_log_tail": runs["export"]["stderr"][-1500:],
        "layer_4bit": layer_weight_bytes(checkpoint),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
