"""The tools a GGUF export runs (llama.cpp's converters, quantizer and tokenizer.model), found or refused before anything is written.

The tools a GGUF export runs, found (or refused) before anything is written.

llama.cpp's own converters do the work: `convert_hf_to_gguf.py` (the language model)
and `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` (LLaVA 1.5's mmproj).
They ship in llama-cpp-python's source distribution on PyPI, which vendors llama.cpp;
lmmtune fetches that one pinned release once with pip, checks its sha256, and keeps the
converters (and the `gguf-py` they import) in its cache. Quantizing to q4_k_m needs
llama.cpp's quantizer, which llama-cpp-python exposes (`llama_model_quantize`).

Llama's SentencePiece `tokenizer.model` for llama.cpp's converter, when a model folder has none.

llama.cpp tokenizes Llama-2 models with SentencePiece's BPE rule: merge the adjacent pair
whose joined piece scores highest. The converter takes the scores from `tokenizer.model`;
without one it reads tokenizer.json and gives every piece the same score (-1000), so
llama.cpp merges left to right and splits words differently from transformers (and it does
not pad the vocabulary to the model's 32064 rows, so the GGUF does not load). A merged
export may lack tokenizer.model (transformers 5 writes tokenizer.json): then the base
model's is used, or one is written from tokenizer.json (score = minus the rank of the merge
that makes the piece) and checked against the transformers tokenizer on probe texts first.

Run llama.cpp's legacy `convert_image_encoder_to_gguf.py` on transformers 5.

    python -m lmmtune.export.gguf_tools SCRIPT [ARGS...]

The script was written for transformers 4.x, whose `CLIPVisionModel` wrapped the tower
in `.vision_model` (`model.vision_model.encoder.layers`, weights named
`vision_model.*`). transformers 5 flattened it (`model.encoder.layers`, `encoder.*`), and
the script stops with "'CLIPVisionModel' object has no attribute 'vision_model'". This
runner gives it the 4.x layout around the same tower and then runs the script unchanged,
so llama.cpp's own code still names the tensors and writes the metadata.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.models.clip import modeling_clip

from lmmtune.data.prompt import SYSTEM_PROMPT
from lmmtune.demo import default_cache_dir
from lmmtune.errors import LmmtuneError

LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python release whose llama.cpp converts and runs the exports (tested)."""
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TEXT_CONVERTER = "convert_hf_to_gguf.py"
IMAGE_ENCODER_CONVERTER = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
# What the converters need of the vendored llama.cpp: the scripts, their package, gguf-py.
NEEDED = (TEXT_CONVERTER, "conversion/", "gguf-py/", "tools/mtmd/legacy-models/", "LICENSE")
INSTALL_EXTRA = "pip install 'lmmtune[gguf]'"
INSTALL_QUANTIZER = (
    f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON} (it builds llama.cpp from source: a C++ "
    "compiler and cmake are needed; CMAKE_ARGS='-DGGML_NATIVE=OFF' gives a portable CPU build)"
)
CONVERTER_TYPES = ("f16", "q8_0")
"""What `convert_hf_to_gguf.py` writes itself; other types are quantized from its f16."""


@dataclass
class GgufTools:
    llama_cpp: Path
    """The llama.cpp source folder holding the converters."""
    quantize: Callable[[Path, Path, str], None] | None
    """Quantizes an f16 GGUF into another type (None: no type beyond the converter's)."""

    @property
    def text_converter(self) -> Path:
        return self.llama_cpp / TEXT_CONVERTER

    @property
    def image_encoder_converter(self) -> Path:
        return self.llama_cpp / IMAGE_ENCODER_CONVERTER


def find_tools(gguf_type: str, llama_cpp_dir: str | None) -> GgufTools:
    """Everything `gguf_type` needs, or one line naming what to install: before any file is written."""
    require_python_packages()
    quantize = None if gguf_type in CONVERTER_TYPES else llama_cpp_quantizer(gguf_type)
    source = Path(llama_cpp_dir).expanduser() if llama_cpp_dir else cached_llama_cpp()
    for script in (TEXT_CONVERTER, IMAGE_ENCODER_CONVERTER):
        if not (source / script).is_file():
            raise LmmtuneError(
                f"export.llama_cpp_dir={source} has no {script}: point it at a llama.cpp "
                "source folder, or leave it null for the pinned copy lmmtune fetches"
            )
    return GgufTools(source, quantize)


def require_python_packages() -> None:
    """The converters import sentencepiece (Llama's tokenizer.model) and lmmtune reads GGUF files."""
    for module in ("gguf", "sentencepiece", "google.protobuf"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise LmmtuneError(
                f"export.format=gguf needs the Python package {module.split('.')[0]}: "
                f"{INSTALL_EXTRA}"
            ) from None


def llama_cpp_quantizer(gguf_type: str) -> Callable[[Path, Path, str], None]:
    """llama.cpp's quantizer through llama-cpp-python, or why it cannot write `gguf_type`."""
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except ImportError:
        raise LmmtuneError(
            f"export.gguf_type={gguf_type} needs llama.cpp's quantizer: {INSTALL_QUANTIZER}; "
            f"or export.gguf_type=f16|q8_0, which the converter writes alone"
        ) from None
    file_type = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if file_type is None or not hasattr(llama_cpp, "llama_model_quantize"):
        raise LmmtuneError(
            f"the installed llama-cpp-python {getattr(llama_cpp, '__version__', '?')} cannot "
            f"write {gguf_type}: pip install llama-cpp-python=={LLAMA_CPP_PYTHON}"
        )

    def quantize(source: Path, target: Path, name: str) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = file_type
        params.nthread = os.cpu_count() or 1
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
        if status != 0 or not target.is_file():
            raise LmmtuneError(f"llama.cpp could not quantize {name} to {gguf_type} ({status})")

    return quantize


def cached_llama_cpp(cache_dir: Path | None = None) -> Path:
    """The pinned llama.cpp converters in lmmtune's cache, fetched with pip on first use."""
    target = (
        cache_dir or default_cache_dir()
    ) / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (target / TEXT_CONVERTER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="lmmtune-llama-cpp-") as folder:
        archive = download_sdist(Path(folder))
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        extract_converters(archive, staging)
        try:
            staging.rename(target)  # atomic: a half-extracted copy is never used
        except OSError:  # another process finished first with the same files
            shutil.rmtree(staging, ignore_errors=True)
    return target


def download_sdist(folder: Path) -> Path:
    """llama-cpp-python's source distribution from PyPI (pip's own client and index settings)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", "-d", str(folder)]
    done = subprocess.run(
        [*command, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    archive = folder / SDIST
    if done.returncode != 0 or not archive.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmmtuneError(
            f"could not fetch llama.cpp's converters (llama-cpp-python=={LLAMA_CPP_PYTHON} from "
            f"PyPI): {last}. Without PyPI, set export.llama_cpp_dir to a llama.cpp source folder"
        )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise LmmtuneError(f"{SDIST} from PyPI has sha256 {digest}, expected {SDIST_SHA256}")
    return archive


def extract_converters(archive: Path, target: Path) -> None:
    """Only the converter scripts, their `conversion` package and gguf-py, from the vendored llama.cpp."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            inner = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if (member.isfile() or member.isdir()) and inner.startswith(NEEDED):
                member.name = inner
                members.append(member)
        tar.extractall(target, members=members, filter="data")


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


CLIPVisionModel = modeling_clip.CLIPVisionModel


class LegacyCLIPVisionModel(torch.nn.Module):
    """transformers 4.x's CLIPVisionModel layout: the tower under `.vision_model`."""

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.vision_model = tower

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> torch.nn.Module:
        tower = CLIPVisionModel.from_pretrained(path, **kwargs)
        return tower if hasattr(tower, "vision_model") else cls(tower)  # 4.x: as it is


def main() -> None:
    script, *args = sys.argv[1:]
    # `from transformers import CLIPVisionModel` in the script resolves to modeling_clip's.
    modeling_clip.CLIPVisionModel = LegacyCLIPVisionModel
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
