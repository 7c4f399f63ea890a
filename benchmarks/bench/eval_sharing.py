"""Eval with many questions per image: one prompt per question against the shared image prefix.

`measure_eval_sharing(model, processor, samples)` answers the same samples both ways
with `lmmtune.eval.generate.generate_answers` (`share_image_prefix` off, then on),
`repeats` times in alternation, and returns the faster time of each way, their ratio,
the prompt tokens each way runs through the model, and whether every answer is equal.
`python -m benchmarks.bench` can call it with its own model and data.

    python -m benchmarks.bench.eval_sharing                       # 6 images x 10 questions
    python -m benchmarks.bench.eval_sharing --images 4 --questions 12 --out eval-sharing.json

Run as a script it builds LLaVA 1.5's image geometry on a CPU: CLIP ViT-L/14 at 336
pixels, so 576 image tokens per image (the `tiny` or `small` scale of
`benchmarks.bench.models`: narrow towers, random weights), the real Llama-2 vocabulary
(`benchmarks.llama_tokenizer`), the base loaded in 4-bit as `eval` loads it, and a
VQA-RAD-shaped set: N images, M questions each, closed and open.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

from lmmtune.data.batches import BatchBuilder
from lmmtune.data.records import Sample
from lmmtune.eval.generate import generate_answers
from lmmtune.eval.image_prefix import ImagePrefixes, plan_answers

QUESTIONS = [
    ("Is there a lesion in this scan?", "closed"),
    ("Which side is the lesion on?", "open"),
    ("Is the scan normal?", "closed"),
    ("What organ is shown?", "open"),
    ("Is there free fluid? Answer with a single word.", "closed"),
    ("Where is the abnormality located?", "open"),
    ("Is this an MRI?", "closed"),
    ("What is the size of the mass?", "open"),
    ("Are the lungs clear?", "closed"),
    ("What modality was used to take this image?", "open"),
    ("Is there a fracture?", "closed"),
    ("Describe the main finding.", "open"),
]
"""Question texts of a VQA-RAD-shaped set: yes/no (closed) and open, of varied lengths."""


def measure_eval_sharing(
    model,
    processor,
    samples: list[Sample],
    batch_size: int = 8,
    max_new_tokens: int = 8,
    repeats: int = 2,
) -> dict:
    """Seconds to answer `samples` one prompt per question and with the image prefix shared
    (the faster of `repeats` alternating runs each), their ratio, and whether the answers
    are equal; CPU seconds too (steadier than wall time on a shared machine)."""
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    answers: dict[bool, list[str]] = {}
    for _ in range(repeats):
        for share in (False, True):
            wall, cpu = time.perf_counter(), time.process_time()
            answers[share] = generate_answers(
                model,
                processor,
                samples,
                max_new_tokens,
                batch_size,
                None,
                share_image_prefix=share,
            )
            runs[share].append((time.perf_counter() - wall, time.process_time() - cpu))
    per_question, shared = min(runs[False]), min(runs[True])
    per_question_cpu, shared_cpu = min(c for _, c in runs[False]), min(c for _, c in runs[True])
    tokens = prompt_tokens(processor, samples)
    return {
        "questions": len(samples),
        "images": len({s.image for s in samples if s.image is not None}),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "per_question_s": round(per_question[0], 3),
        "shared_s": round(shared[0], 3),
        "ratio": round(per_question[0] / shared[0], 2),
        "per_question_cpu_s": round(per_question_cpu, 3),
        "shared_cpu_s": round(shared_cpu, 3),
        "cpu_ratio": round(per_question_cpu / shared_cpu, 2),
        **tokens,
        "answers_equal": answers[False] == answers[True],
    }


def prompt_tokens(processor, samples: list[Sample]) -> dict:
    """Prompt tokens the model runs through before generating: every prompt whole, against
    each image's shared prefix once plus each question's own tokens."""
    build = BatchBuilder(processor, max_length=10**9, max_image_pixels=None)
    whole = sum(len(build.tokenize.prompt_ids(sample)) for sample in samples)
    shared = whole
    per_image = plan_answers(samples, share_image_prefix=True).per_image
    if per_image:
        prefixes = ImagePrefixes(build, samples, per_image)
        repeated = len(prefixes.order) - len(per_image)  # prompts past each image's first
        shared -= (prefixes.length or 0) * repeated
    return {
        "prompt_tokens_per_question": whole,
        "prompt_tokens_shared": shared,
        "prompt_token_ratio": round(whole / shared, 2),
    }


def vqa_rad_shaped(folder: Path, images: int, questions: int, seed: int = 0) -> list[Sample]:
    """`images` synthetic scans (PNG files in `folder`), `questions` questions about each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for image_index in range(images):
        path = folder / f"scan{image_index}.png"
        scan = Image.new("RGB", (rng.randint(300, 500), rng.randint(300, 500)), (30, 30, 30))
        x, y = rng.randint(40, 250), rng.randint(40, 250)
        ImageDraw.Draw(scan).ellipse((x, y, x + 40, y + 40), fill=(220, 220, 220))
        scan.save(path)
        for question_index in range(questions):
            text, kind = QUESTIONS[(image_index + question_index) % len(QUESTIONS)]
            samples.append(
                Sample(
                    id=f"{image_index}-{question_index}",
                    turns=[(text, "")],
                    image=str(path),
                    question_type=kind,
                )
            )
    return samples


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    import torch
    from transformers import AutoProcessor

    from benchmarks.bench.models import random_checkpoint
    from benchmarks.llama_tokenizer import llama2_processor_dir
    from lmmtune.config import ModelConfig, QuantConfig
    from lmmtune.model import load_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench.eval_sharing")
    parser.add_argument("--scale", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--questions", type=int, default=10, help="questions per image")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    checkpoint = random_checkpoint(args.scale, torch.float32)
    model = load_model(
        ModelConfig(path=str(checkpoint), dtype="float32"),
        QuantConfig(mode="4bit", compute_dtype="float32"),
    )
    processor = AutoProcessor.from_pretrained(llama2_processor_dir(legacy=False))
    with tempfile.TemporaryDirectory(prefix="lmmtune-eval-sharing-") as folder:
        samples = vqa_rad_shaped(Path(folder), args.images, args.questions)
        report = measure_eval_sharing(
            model, processor, samples, args.batch_size, args.max_new_tokens, args.repeats
        )
    report["scale"] = args.scale
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
