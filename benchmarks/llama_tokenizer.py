"""The real Llama-2 vocabulary (LLaVA 1.5's Vicuna v1.5 tokenizer), rebuilt offline from npm.

No model hub is needed: npm's `llama-tokenizer-js` (MIT) embeds Llama-1/2's 32,000
pieces (base64, one per line) and 61,249 merges (pairs of uint16 vocabulary ids). A
`tokenizers` BPE built from them with byte fallback is the Llama-2 tokenizer
("Hello world" -> [1, 15043, 3186]). Around it this module writes a processor
directory shaped like llava-hf/llava-1.5-7b-hf's (`<image>`=32000, `<pad>`=32001, the
CLIP ViT-L/14-336 image processor), once per `legacy` setting, into the lmmtune cache.
Tests (through `tests/real_tokenizer.py`) and `benchmarks/real_shapes.py` use it; it runs
npm, so it lives here and not in the package. The vocabulary is never committed.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from tokenizers import AddedToken
from transformers import CLIPImageProcessorPil, LlamaTokenizer, LlavaProcessor

from lmmtune.demo import default_cache_dir
from lmmtune.errors import LmmtuneError

NPM_PACKAGE = "llama-tokenizer-js"
NPM_VERSION = "1.2.2"
VOCAB_SIZE = 32000
MERGES = 61249
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 336
PATCH_SIZE = 14


class TokenizerUnavailable(LmmtuneError):
    """npm is missing or its registry cannot be reached: the vocabulary cannot be built."""


def llama2_processor_dir(legacy: bool, cache_dir: Path | None = None) -> Path:
    """A llava-1.5-hf-shaped processor directory with the real Llama-2 tokenizer (built once)."""
    name = f"llama2-llava-processor-{NPM_VERSION}-legacy-{str(legacy).lower()}"
    target = (cache_dir or default_cache_dir()) / name
    if not (target / "processor_config.json").exists():
        vocab, merges = read_npm_vocabulary()
        _save_atomically(build_llava_processor(vocab, merges, legacy), target)
    return target


def read_npm_vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """Install `llama-tokenizer-js` into a temporary folder and decode its vocabulary and merges."""
    if shutil.which("npm") is None:
        raise TokenizerUnavailable("npm is not installed: cannot build the Llama-2 tokenizer")
    with tempfile.TemporaryDirectory(prefix="lmmtune-npm-") as folder:
        command = ["npm", "install", "--no-save", "--ignore-scripts", "--no-audit", "--no-fund"]
        result = subprocess.run(
            [*command, "--prefix", folder, f"{NPM_PACKAGE}@{NPM_VERSION}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        source = Path(folder, "node_modules", NPM_PACKAGE, "llama-tokenizer.js")
        if result.returncode != 0 or not source.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise TokenizerUnavailable(f"npm install {NPM_PACKAGE} failed: {last}")
        script = source.read_text(encoding="utf-8")
    vocab = decode_vocabulary(_constant(script, "llama_vocab_base64"))
    return vocab, decode_merges(_constant(script, "llama_merges_binary"), vocab)


def _constant(script: str, name: str) -> str:
    match = re.search(rf'const {name} = "([^"]+)"', script)
    if match is None:
        raise LmmtuneError(f"{NPM_PACKAGE}@{NPM_VERSION} has no constant {name}")
    return match.group(1)


def decode_vocabulary(encoded: str) -> list[str]:
    """Pieces in id order: base64 of the UTF-8 pieces joined by line breaks."""
    pieces = base64.b64decode(encoded).decode("utf-8").split("\n")
    if len(pieces) != VOCAB_SIZE:
        raise LmmtuneError(f"expected {VOCAB_SIZE} pieces, found {len(pieces)}")
    return pieces


def decode_merges(encoded: str, vocab: list[str]) -> list[tuple[str, str]]:
    """Merges in priority order: base64 of little-endian uint16 pairs of vocabulary ids."""
    data = base64.b64decode(encoded)
    ids = struct.unpack(f"<{len(data) // 2}H", data)
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]
    if len(merges) != MERGES:
        raise LmmtuneError(f"expected {MERGES} merges, found {len(merges)}")
    return merges


def build_tokenizer(vocab: list[str], merges: list[tuple[str, str]], legacy: bool):
    """Llama-2's tokenizer as llava-hf ships it: BOS added, `<image>` and `<pad>` after the vocabulary."""
    tokenizer = LlamaTokenizer(
        vocab={piece: index for index, piece in enumerate(vocab)},
        merges=merges,
        legacy=legacy,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=4096,
    )
    # In llava-hf's order: <image> first (32000), then <pad> (32001).
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.init_kwargs["legacy"] = legacy  # saved to tokenizer_config.json, as llava-hf's
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    if ids != [IMAGE_TOKEN_ID, PAD_TOKEN_ID]:
        raise LmmtuneError(f"<image>, <pad> got ids {ids}, expected 32000, 32001")
    return tokenizer


def build_llava_processor(vocab: list[str], merges: list[tuple[str, str]], legacy: bool):
    """llava-hf/llava-1.5-7b-hf's processor: CLIP ViT-L/14 at 336 px, 576 image tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(vocab, merges, legacy),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _save_atomically(processor, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(target)  # a half-written directory is never picked up
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
