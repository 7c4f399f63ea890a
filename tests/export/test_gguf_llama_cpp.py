"""GGUF exports checked by llama.cpp itself (llama-cpp-python built from its pinned sdist, cached).

A small LLaVA with Llama-2's real vocabulary is trained with the demo recipe, exported as
GGUF in f16, q8_0 and q4_k_m, and asked the demo's 128 eval questions by llama.cpp; the
same questions go to the merged export in transformers, as its README shows. The pinned
llama.cpp shifts LLaVA's image tokens by one patch (ggml-org/llama.cpp#25814): the tests
compute that layout in transformers to show the mmproj is exact, compare the language model
with the same image features, and measure what users get. At 7B width (reduced depth)
llama.cpp's image features of non-square images are measured against training's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.export.gguf_helpers import real_vocab_llava_dir, with_llama_cpp
from tests.real_tokenizer import real_processor_dir

TYPES = ("f16", "q8_0", "q4_k_m")
MAX_NEW_TOKENS = 8
F16_LOGIT_TOLERANCE = 2e-3
"""Largest first-token logit difference of the f16 GGUF in llama.cpp against the merged
export in transformers (float32 compute, the same image features), relative to the largest
logit; measured 2.5e-4 on the demo's questions."""
CHECK_SCRIPT = Path(__file__).with_name("llama_cpp_answers.py")


def llama_cpp_answers(export_dir: Path, gguf_type: str, questions: Path, out: Path) -> dict:
    """Run tests/export/llama_cpp_answers.py on one GGUF export; its answers and logits."""
    command = [sys.executable, str(CHECK_SCRIPT), str(export_dir / f"model-{gguf_type}.gguf")]
    command += [str(export_dir / "mmproj-model-f16.gguf"), str(questions), str(out)]
    command += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=1800, env=with_llama_cpp(dict(os.environ))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "answers": json.loads(out.read_text()),
        "logits": np.load(out.with_suffix(".npy")),
        "embeddings": np.load(out.with_suffix(".embeddings.npy")),
    }


def chat_inputs(processor, image: str, question: str) -> dict:
    """The merged export's own prompt for one question, as its README shows."""
    from PIL import Image

    content = [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def llama_cpp_layout_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image features llama.cpp's LLaVA graph computes (ggml-org/llama.cpp#25814, in the
    pinned release): the class token after the patches, positions 0..n in that order, and
    rows 1..n kept, so each image token holds the next patch (the last one the class token)."""
    tower, config = model.model.vision_tower, model.config
    patches = tower.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    rows = torch.cat([patches, tower.embeddings.class_embedding.expand(1, 1, -1)], dim=1)
    rows = rows + tower.embeddings.position_embedding.weight[: rows.shape[1]]
    hidden = tower.pre_layrnorm(rows)
    layers = len(tower.encoder.layers) + 1 + config.vision_feature_layer  # -2: all but the last
    for layer in tower.encoder.layers[:layers]:
        hidden = layer(hidden, attention_mask=None)  # a tensor in transformers 5
    return model.model.multi_modal_projector(hidden[0, 1:])


@torch.no_grad()
def transformers_answers(export_dir: Path, questions: list[dict], image_embeddings=None) -> dict:
    """The merged export in plain transformers (float32 compute): greedy answers, first-token
    logits and per image the features training computes and those in llama.cpp's layout.
    With `image_embeddings` (one per image, in order) those replace the image features."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(export_dir)
    model = AutoModelForImageTextToText.from_pretrained(export_dir, dtype=torch.float32).eval()
    embed = model.get_input_embeddings()
    answers, logits, features, emulated, images = [], [], [], [], []
    for item in questions:
        inputs = chat_inputs(processor, item["image"], item["question"])
        if item["image"] not in images:
            images.append(item["image"])
            pixels = inputs["pixel_values"]
            features.append(model.get_image_features(pixel_values=pixels).pooler_output[0])
            emulated.append(llama_cpp_layout_features(model, pixels))
        ids = inputs["input_ids"][0]
        image = features[images.index(item["image"])]
        if image_embeddings is not None:
            image = torch.as_tensor(image_embeddings[images.index(item["image"])])
        answer, step_logits = greedy_with_image(model, embed, ids, image)
        answers.append({"text_ids": [i for i in ids.tolist() if i != 32000], "answer_ids": answer})
        logits.append(step_logits.numpy())
    return {
        "answers": answers,
        "logits": np.stack(logits),
        "embeddings": torch.stack(features).numpy(),
        "llama_cpp_layout": torch.stack(emulated).numpy(),
    }


def greedy_with_image(model, embed, ids: torch.Tensor, image: torch.Tensor) -> tuple:
    """Greedy decoding with `image` at the image positions; the answer and first-token logits."""
    sequence = embed(ids[None]).clone()
    sequence[0, ids == 32000] = image.to(sequence.dtype)
    answer, first = [], None
    for _ in range(MAX_NEW_TOKENS):
        step = model(inputs_embeds=sequence).logits[0, -1]
        first = step if first is None else first
        token = int(step.argmax())
        if token == 2:
            break
        answer.append(token)
        sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], dim=1)
    return answer, first


def demo_questions(run_dir: Path, folder: Path, processor) -> list[dict]:
    """The demo's eval questions, each with its image twice: as recorded (64x48) and already
    padded and resized as training does (56x56), where llama.cpp's own resizing is a no-op."""
    from PIL import Image

    from lmmtune.data.images import padded_to_square

    records = json.loads((run_dir / "demo_data" / "eval.json").read_text())
    size = processor.image_processor.crop_size["height"]
    questions = []
    for record in records:
        image = run_dir / "demo_data" / record["image"]
        square = folder / f"square-{image.name}"
        if not square.exists():
            padded = padded_to_square(Image.open(image).convert("RGB"), processor.image_processor)
            padded.resize((size, size), Image.BICUBIC).save(square)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        questions.append({"image": str(image), "square": str(square), "question": question})
    return questions


def write_questions(questions: list[dict], image_key: str, target: Path) -> Path:
    lines = [json.dumps({"image": q[image_key], "question": q["question"]}) for q in questions]
    target.write_text("\n".join(lines))
    return target


def relative_logit_diff(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(candidate - reference).max() / np.abs(reference).max())


def embedding_distance(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Per image: cosine similarity and L2 distance relative to the reference's norm."""
    flat_c, flat_r = candidate.reshape(len(candidate), -1), reference.reshape(len(reference), -1)
    norms = np.linalg.norm(flat_c, axis=1) * np.linalg.norm(flat_r, axis=1)
    cosine = (flat_c * flat_r).sum(1) / norms
    relative = np.linalg.norm(flat_c - flat_r, axis=1) / np.linalg.norm(flat_r, axis=1)
    return {"cosine_min": float(cosine.min()), "relative_l2_max": float(relative.max())}


def same_answers(first: dict, second: dict) -> float:
    pairs = zip(first["answers"], second["answers"], strict=True)
    return float(np.mean([a["answer_ids"] == b["answer_ids"] for a, b in pairs]))


def gguf_tensor(path: Path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    return np.asarray(tensor.data)


def check_tensors_and_metadata(export_dir: Path, merged_dir: Path) -> None:
    """The GGUF holds the merged weights under llama.cpp's names (key layout checked), the
    training image settings and llama.cpp's chat template."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from lmmtune.export.gguf_usage import LLAMA_CPP_CHAT_TEMPLATE

    merged = load_file(merged_dir / "model.safetensors")  # as transformers 5.24 saved it
    model, mmproj = export_dir / "model-f16.gguf", export_dir / "mmproj-model-f16.gguf"
    pairs = [
        (model, "token_embd.weight", "language_model.model.embed_tokens.weight"),
        (model, "output.weight", "language_model.lm_head.weight"),
        (model, "blk.1.ffn_down.weight", "language_model.model.layers.1.mlp.down_proj.weight"),
        (mmproj, "mm.0.weight", "multi_modal_projector.linear_1.weight"),
        (mmproj, "mm.2.bias", "multi_modal_projector.linear_2.bias"),
        (mmproj, "v.patch_embd.weight", "vision_tower.embeddings.patch_embedding.weight"),
    ]
    for path, gguf_name, merged_name in pairs:
        expected = merged[merged_name].float().numpy()
        assert np.array_equal(gguf_tensor(path, gguf_name).astype(np.float32), expected), gguf_name
    fields = GGUFReader(mmproj)
    mean = fields.get_field("clip.vision.image_mean").contents()
    assert np.allclose(mean, [0.48145466, 0.4578275, 0.40821073])
    assert fields.get_field("clip.projector_type").contents() == "mlp"
    assert fields.get_field("clip.vision.image_size").contents() == 56
    template = GGUFReader(model).get_field("tokenizer.chat_template").contents()
    assert template == LLAMA_CPP_CHAT_TEMPLATE


def run_readme_example(export_dir: Path, image: str) -> str:
    """The llama-cpp-python snippet of the export's README, run in the export folder."""
    import re

    shutil.copy(image, export_dir / "scan.png")
    readme = (export_dir / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=export_dir,
        capture_output=True,
        text=True,
        timeout=600,
        env=with_llama_cpp(dict(os.environ)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.slow  # minutes: demo training, three GGUF exports, llama.cpp on 128 questions each
@pytest.mark.heavy  # and the llama-cpp-python build (~6 min on 2 cores): not in CI
def test_llama_cpp_answers_the_gguf_export_as_transformers_answers_the_merged_one(tmp_path):
    from transformers import AutoProcessor

    model = real_vocab_llava_dir()
    common = ["output_dir=run", "tracking=none"]
    train = ["recipe=demo", f"model.path={model}", *common, "train.epochs=2", "eval.before=false"]
    trained = run_cli(train, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = run_cli(["export", *common, "export.dtype=float16"], cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    run_dir = tmp_path / "run"
    for gguf_type in TYPES:
        export = ["export", *common, "export.format=gguf", f"export.gguf_type={gguf_type}"]
        done = run_cli(
            [*export, f"export.dir=run/gguf-{gguf_type}"], cwd=tmp_path, env=with_llama_cpp()
        )
        assert done.returncode == 0, done.stderr[-3000:]
    check_tensors_and_metadata(run_dir / "gguf-f16", run_dir / "export-merged")
    processor = AutoProcessor.from_pretrained(run_dir / "export-merged")
    questions = demo_questions(run_dir, tmp_path, processor)
    square = write_questions(questions, "square", tmp_path / "square.jsonl")
    recorded = write_questions(questions, "image", tmp_path / "recorded.jsonl")
    squares = [{**q, "image": q["square"]} for q in questions]
    results = {
        t: llama_cpp_answers(run_dir / f"gguf-{t}", t, square, tmp_path / f"{t}.json")
        for t in TYPES
    }
    f16 = results["f16"]
    merged_dir = run_dir / "export-merged"
    reference = transformers_answers(merged_dir, questions)  # the images as recorded (64x48)
    same_image = transformers_answers(merged_dir, squares, f16["embeddings"])
    # The 56x56 copies are exactly what training makes of the recorded 64x48 images.
    assert np.array_equal(same_image["embeddings"], reference["embeddings"])
    # llama.cpp reads the prompt exactly as training wrote it, with 16 image positions.
    assert [a["text_ids"] for a in f16["answers"]] == [a["text_ids"] for a in reference["answers"]]
    assert {a["image_tokens"] for a in f16["answers"]} == {16}
    # The mmproj is exact: llama.cpp's image features equal the pinned llama.cpp's layout
    # computed in transformers from the same pixels (its defect, not the conversion).
    layout = embedding_distance(f16["embeddings"], same_image["llama_cpp_layout"])
    assert layout["cosine_min"] > 0.9999 and layout["relative_l2_max"] < 2e-3
    # f16 language model: with the same image features, the same greedy answers token for
    # token, and the same first-token logits.
    assert same_answers(f16, same_image) == 1.0
    f16_logits = relative_logit_diff(f16["logits"], same_image["logits"])
    assert f16_logits < F16_LOGIT_TOLERANCE
    # As users get it: the recorded images through llama.cpp's preprocessing and graph.
    f16_recorded = llama_cpp_answers(run_dir / "gguf-f16", "f16", recorded, tmp_path / "rec.json")
    measured = {
        "f16_relative_logit_diff": f16_logits,
        "agreement_with_f16": {t: same_answers(results[t], f16) for t in TYPES[1:]},
        "f16_agreement_with_training_64x48": same_answers(f16_recorded, reference),
        "image_features_vs_training_64x48": embedding_distance(
            f16_recorded["embeddings"], reference["embeddings"]
        ),
        "image_features_vs_llama_cpp_layout_56x56": layout,
        "answers": sorted({a["answer"] for a in f16["answers"]}),
        "sizes": {t: (run_dir / f"gguf-{t}" / f"model-{t}.gguf").stat().st_size for t in TYPES},
    }
    print(json.dumps(measured))
    (tmp_path / "measured.json").write_text(json.dumps(measured, indent=1))
    assert measured["agreement_with_f16"]["q8_0"] >= 0.95
    assert measured["agreement_with_f16"]["q4_k_m"] >= 0.8
    readme_answer = run_readme_example(run_dir / "gguf-f16", questions[1]["square"])
    assert readme_answer == f16["answers"][1]["answer"]


def non_square_images(folder: Path) -> list[Path]:
    """Two landscape images: a demo scan enlarged (flat areas, one bright lesion) and a
    photo-like one (gradients, shapes, fine texture)."""
    import random

    from PIL import Image, ImageDraw, ImageFilter

    from lmmtune.demo import draw_scan

    scan = draw_scan(random.Random(3), "left").resize((640, 480), Image.BICUBIC)
    photo = Image.linear_gradient("L").resize((500, 300)).convert("RGB")
    draw = ImageDraw.Draw(photo)
    draw.rectangle((40, 60, 200, 220), fill=(200, 40, 40))
    draw.ellipse((260, 40, 460, 260), fill=(30, 120, 220), outline=(250, 250, 250), width=6)
    photo = Image.blend(photo, Image.effect_noise((500, 300), 60).convert("RGB"), 0.2)
    paths = [folder / "scan-640x480.png", folder / "photo-500x300.png"]
    scan.save(paths[0])
    photo.filter(ImageFilter.SMOOTH).save(paths[1])
    return paths


@torch.no_grad()
def training_features(checkpoint: Path, images: list[Path], question: str) -> dict:
    """What training computes from each image (lmmtune's padding processor), and the same
    pixels through the pinned llama.cpp's layout."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmmtune.export.processor import export_processor

    processor = export_processor(AutoProcessor.from_pretrained(checkpoint))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    features, emulated = [], []
    for path in images:
        pixels = chat_inputs(processor, str(path), question)["pixel_values"]
        features.append(model.get_image_features(pixel_values=pixels).pooler_output[0])
        emulated.append(llama_cpp_layout_features(model, pixels))
    return {"embeddings": torch.stack(features).numpy(), "layout": torch.stack(emulated).numpy()}


@pytest.mark.slow  # minutes: 7B-wide layers converted and run on a CPU
@pytest.mark.heavy  # not in CI
def test_at_7b_width_llama_cpp_sees_non_square_images_close_to_training(tmp_path):
    """LLaVA-1.5-7B's widths (CLIP ViT-L/14-336, 576 image tokens, 4096-wide Llama, 2 layers,
    random weights): `export.model=` a merged folder, f16, in llama.cpp."""
    from benchmarks.real_shapes import build_checkpoint

    real_processor_dir(False)  # skips where npm cannot be reached
    checkpoint = build_checkpoint(tmp_path, text_layers=2, vision_layers=3)
    export = ["export", "tracking=none", "export.format=gguf", f"export.model={checkpoint}"]
    done = run_cli([*export, f"export.dir={tmp_path / 'gguf'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    question = "Is there a lesion in this scan?"
    images = non_square_images(tmp_path)
    questions = tmp_path / "questions.jsonl"
    lines = [json.dumps({"image": str(path), "question": question}) for path in images]
    questions.write_text("\n".join(lines))
    gguf = llama_cpp_answers(tmp_path / "gguf", "f16", questions, tmp_path / "answers.json")
    training = training_features(checkpoint, images, question)
    assert {a["image_tokens"] for a in gguf["answers"]} == {576}
    measured = {
        # llama.cpp's resize-then-pad against training's pad-then-resize, same graph:
        "preprocessing_only": embedding_distance(gguf["embeddings"], training["layout"]),
        # what a user gets: preprocessing and the pinned llama.cpp's patch/class-token shift.
        "vs_training": embedding_distance(gguf["embeddings"], training["embeddings"]),
        "report": json.loads((tmp_path / "gguf" / "export_report.json").read_text())["files"],
    }
    print(json.dumps(measured))
    (tmp_path / "measured.json").write_text(json.dumps(measured, indent=1))
    assert measured["preprocessing_only"]["cosine_min"] > 0.95
