"""Helpers for the data tests: real files in tmp_path, written with PIL and json."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def llava(record_id: str, image: str | None, question: str = "Is there a lesion?", answer="yes"):
    """A single-turn LLaVA record; the `<image>` placeholder goes with the image."""
    record = {
        "id": record_id,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image is not None:
        record["image"] = image
    return record


def chat(role: str, text: str, image: bool = False) -> dict:
    """One message of a chat-shaped record (TRL / Hugging Face VLM data sets)."""
    parts = [{"type": "image"}] if image else []
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def save_image(path: Path, size=(32, 24), colour=(200, 30, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def kinds(problems) -> list[str]:
    return [p.kind for p in problems]
