"""Llama's SentencePiece `tokenizer.model` for llama.cpp's converter, when a model folder has none.

llama.cpp tokenizes Llama-2 models with SentencePiece's BPE rule: merge the adjacent pair
whose joined piece scores highest. The converter takes the scores from `tokenizer.model`;
without one it reads tokenizer.json and gives every piece the same score (-1000), so
llama.cpp merges left to right and splits words differently from transformers (and it does
not pad the vocabulary to the model's 32064 rows, so the GGUF does not load). A merged
export may lack tokenizer.model (transformers 5 writes tokenizer.json): then the base
model's is used, or one is written from tokenizer.json (score = minus the rank of the merge
that makes the piece) and checked against the transformers tokenizer on probe texts first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmmtune.data.template import SYSTEM_PROMPT
from lmmtune.errors import LmmtuneError

TOKENIZER_MODEL = "tokenizer.model"
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
SPECIAL_TYPES = {"<unk>": 2, "<s>": 3, "</s>": 3}  # SentencePiece: UNKNOWN, CONTROL
NORMAL, BYTE = 1, 6
BPE = 2
# Text the derived tokenizer must split exactly as transformers does (no leading space
# and no special token: SentencePiece always adds the leading "▁", and leaves "</s>" as text).
PROBES = [
    SYSTEM_PROMPT,
    "USER: ",
    "\nIs there a lesion in this scan? ASSISTANT:",
    "Which side is the lesion on? left right yes no",
    "T2-weighted MRI, x-ray of the chest: 3 nodules (12 mm)\n\ttabs  and  double spaces",
    "Ünïcödé: Größe, 漢字, émoji 🙂, naïve café",
]


def llama_sentencepiece_model(tokenizer_json: Path) -> bytes:
    """A SentencePiece BPE model equal to this Llama-style tokenizer.json (byte fallback)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    if spec.get("type") != "BPE" or not spec.get("byte_fallback"):
        raise LmmtuneError(
            f"{tokenizer_json}: not a Llama SentencePiece tokenizer (BPE with byte fallback); "
            "llama.cpp's converter cannot write its vocabulary"
        )
    merges = spec["merges"]
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, index)
    pieces = sorted(spec["vocab"].items(), key=lambda item: item[1])
    if [index for _, index in pieces] != list(range(len(pieces))):
        raise LmmtuneError(f"{tokenizer_json}: the vocabulary ids are not 0..{len(pieces) - 1}")
    proto = model_pb2.ModelProto()
    for piece, index in pieces:
        entry = proto.pieces.add(piece=piece, score=0.0)
        if piece in SPECIAL_TYPES:
            entry.type = SPECIAL_TYPES[piece]
        elif BYTE_PIECE.fullmatch(piece):
            entry.type = BYTE
        else:  # single characters, made by no merge, come after every merged piece
            entry.type = NORMAL
            entry.score = -float(rank.get(piece, len(merges) + index))
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = BPE, len(pieces), True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = proto.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    return proto.SerializeToString()


def check_same_tokens(model: bytes, tokenizer, source: Path) -> None:
    """Refuse a derived tokenizer.model that splits any probe text unlike `tokenizer`."""
    from sentencepiece import SentencePieceProcessor

    derived = SentencePieceProcessor(model_proto=model)
    for text in PROBES:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        if derived.encode(text) != expected:
            raise LmmtuneError(
                f"{source}: the tokenizer.model written for llama.cpp splits {text[:40]!r} "
                f"unlike the model's tokenizer; add the base model's tokenizer.model to "
                f"{source.parent}"
            )


def added_tokens(tokenizer_json: Path, first_id: int) -> dict[str, int]:
    """Tokens added after the SentencePiece vocabulary (`<image>`, `<pad>`), for the converter."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return {
        token["content"]: token["id"] for token in data["added_tokens"] if token["id"] >= first_id
    }


def provide_tokenizer_model(model_dir: Path, base_dirs: list[Path], target: Path, tokenizer) -> str:
    """Write `target/tokenizer.model` for the converter; return where it came from."""
    for folder in [model_dir, *base_dirs]:
        found = folder / TOKENIZER_MODEL
        if found.is_file():
            (target / TOKENIZER_MODEL).write_bytes(found.read_bytes())
            return str(found)
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise LmmtuneError(f"{model_dir} has neither tokenizer.model nor tokenizer.json")
    model = llama_sentencepiece_model(tokenizer_json)
    check_same_tokens(model, tokenizer, tokenizer_json)
    (target / TOKENIZER_MODEL).write_bytes(model)
    return "written from tokenizer.json"
