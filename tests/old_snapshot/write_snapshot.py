"""Write a llava-hf-style LLaVA 1.5 checkpoint with transformers 4.36 itself, as the published
snapshots were written. Run by `tests/old_snapshot/__init__.py` in a side virtualenv that has
`transformers==4.36.*` (never lmmtune, never transformers 5).

    python write_snapshot.py --vocab tokenizer.json --out DIR --width 7b|13b [--weights]
        [--text-layers 2 --vision-layers 3] [--legacy false]

What 4.36 writes itself: config.json (its partial `text_config`/`vision_config` of values
that differ from the defaults), the sharded `model-0000X-of-0000N.safetensors` with
`model.safetensors.index.json` in 4.36's weight names (`language_model.model.layers...`),
generation_config.json, tokenizer.json from its own Llama converter (normalizer
`Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer), tokenizer_config.json,
special_tokens_map.json and a CLIPImageProcessor preprocessor_config.json with centre crop.
The converter normally starts from SentencePiece's tokenizer.model; here its `tokenizer`
step takes the Llama-2 vocabulary and merges from lmmtune's rebuilt tokenizer.json (there
is no tokenizer.model offline), the rest of the conversion is 4.36's own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizerFast,
    LlavaConfig,
    LlavaProcessor,
)
from transformers.convert_slow_tokenizer import LlamaConverter

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WIDTHS = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40},
}


class VocabularyConverter(LlamaConverter):
    """4.36's Llama converter with the vocabulary given as pieces and merges."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab_ids, self.merges, self.proto = vocab, merges, None

    def tokenizer(self, proto):
        tokenizer = Tokenizer(
            BPE(self.vocab_ids, self.merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
        )
        tokenizer.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")]
        )
        return tokenizer


def read_vocabulary(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = {piece: index for piece, index in model["vocab"].items() if index < 32000}
    return vocab, merges


def build_tokenizer(vocab_file: Path, legacy: bool) -> LlamaTokenizerFast:
    """llava-hf's tokenizer: Llama-2's vocabulary, `<image>` 32000 and `<pad>` 32001 added."""
    converted = VocabularyConverter(*read_vocabulary(vocab_file)).converted()
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=converted,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        legacy=legacy,
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.init_kwargs["legacy"] = legacy
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    return tokenizer


def build_config(width: str, text_layers: int, vision_layers: int) -> LlavaConfig:
    """llava-hf/llava-1.5-*-hf's config at reduced depth (CLIP ViT-L/14-336, Vicuna width)."""
    text = LlamaConfig(
        **WIDTHS[width],
        num_hidden_layers=text_layers,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        torch_dtype="float16",
        architectures=["LlamaForCausalLM"],
        _name_or_path=f"lmsys/vicuna-{width}-v1.5",
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=vision_layers,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        vocab_size=32000,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=32000,
        pad_token_id=32001,
        vocab_size=32064,
        tie_word_embeddings=False,
        torch_dtype="float16",
        architectures=["LlavaForConditionalGeneration"],
    )


def write_weights(config: LlavaConfig, out: Path, shard_size: str) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.float16)
    model.generation_config.pad_token_id = 32001
    model.save_pretrained(out, max_shard_size=shard_size, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", choices=sorted(WIDTHS), default="7b")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--legacy", choices=["true", "false"], default="false")
    parser.add_argument("--weights", action="store_true", help="also random fp16 weights")
    parser.add_argument("--shard-size", default="400MB")
    args = parser.parse_args()
    config = build_config(args.width, args.text_layers, args.vision_layers)
    if args.weights:
        write_weights(config, args.out, args.shard_size)
    else:
        config.save_pretrained(args.out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    tokenizer = build_tokenizer(args.vocab, args.legacy == "true")
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(args.out)


if __name__ == "__main__":
    main()
