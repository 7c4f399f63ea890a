"""The processor an export ships: LLaVA 1.5's own prompt and image padding, for plain transformers.

The llava-hf chat template differs from what LLaVA 1.5 (and lmmtune) trains on: no
system line, no `</s>` after answers. The template below renders exactly
`lmmtune.data.prompt.render_conversation`:

    <s> SYSTEM USER: <image> \n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

and the image processor pads to a square with the mean colour before resizing
(`do_pad`), as lmmtune's training does, instead of centre-cropping the edges away.

Token ids, not only text, must equal training's (`lmmtune.data.prompt`): a `▁` after
`<s>` and after `<image>`, none after `</s>`. The exported tokenizer.json is therefore
rewritten into one pipeline that adds no `▁` after special tokens (no normalizer, a
Metaspace pre-tokenizer with `prepend_scheme=first`, `legacy=false`), whatever the base
model's file said (transformers 4.3x's `Prepend`/`Replace` normalizer, Metaspace
`always`/`never`, `legacy` true or false); transformers 5 loads that pipeline as written,
with or without a model config.json beside it. The template writes the `▁` as a space:
`<s> A chat ...`, `<image>
...`. `export_processor` checks the ids on probe conversations."""

from __future__ import annotations

import copy

from tokenizers import pre_tokenizers
from transformers import LlavaProcessor

from lmmtune.data.images import square_padding_processor
from lmmtune.data.prompt import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, chunk_tokenizer, render_prompt
from lmmtune.errors import LmmtuneError

_TEXT = "selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')"
_SYSTEM = SYSTEM_PROMPT.replace("'", "\\'")

# Literal text is written as {{- '...' -}} so that the whitespace control of the tags
# around it never eats a space the prompt needs.
VICUNA_V1_CHAT_TEMPLATE = (
    "{{- bos_token + ' ' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set content = messages[0]['content'] -%}"
    "{{- content if content is string else content | " + _TEXT + " -}}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{- '" + _SYSTEM + "' -}}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' ' if loop.first else '' -}}{{- 'USER: ' -}}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{- '<image> \\n' -}}{%- endfor -%}"
    "{{- content | " + _TEXT + " -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- generation -%}"
    "{{- ' ' + (content if content is string else content | " + _TEXT + ") + eos_token -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)


def export_processor(processor) -> LlavaProcessor:
    """The training processor with a padding image processor and the Vicuna v1 chat template."""
    exported = LlavaProcessor(
        image_processor=square_padding_processor(processor.image_processor),  # training's pad
        tokenizer=no_prefix_after_specials(processor.tokenizer),
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )
    check_prompt_ids(exported, processor)
    return exported


def no_prefix_after_specials(tokenizer):
    """A copy of `tokenizer` that puts no `▁` after special tokens (the template writes it).

    The copy's tokenizer.json has no normalizer and a Metaspace pre-tokenizer that prepends
    `▁` at the start of the text only, split nowhere: the pipeline transformers 5 writes for
    a `legacy=false` Llama tokenizer, and rebuilds from `legacy=false` when it loads the
    folder without a model config.json. The input's own pipeline must be one lmmtune reads.
    """
    marker = chunk_tokenizer(tokenizer).pipeline.replacement
    tokenizer = copy.deepcopy(tokenizer)
    if hasattr(tokenizer, "legacy"):  # transformers rebuilds Llama's pre-tokenizer from it
        tokenizer.legacy = False
    tokenizer.init_kwargs["legacy"] = False
    tokenizer.init_kwargs.pop("add_prefix_space", None)  # a False here would mean "never"
    backend = tokenizer.backend_tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=marker, prepend_scheme="first", split=False
    )
    return tokenizer


PROBE = [("Is there a lesion?", "yes"), ("Which side, 1 or 2?", "left")]


def check_prompt_ids(exported: LlavaProcessor, processor) -> None:
    """Raise if the exported template's ids differ from training's on a probe conversation."""
    chunks = chunk_tokenizer(processor.tokenizer)
    for has_image in (True, False):
        history, (question, _) = PROBE[:1], PROBE[1]
        training = chunks.encode(render_prompt(question, has_image, IMAGE_PLACEHOLDER, history))[0]
        first = [{"type": "text", "text": PROBE[0][0]}]
        messages = [
            {"role": "user", "content": ([{"type": "image"}] if has_image else []) + first},
            {"role": "assistant", "content": PROBE[0][1]},
            {"role": "user", "content": question},
        ]
        text = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = exported.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != training:
            raise LmmtuneError(
                "the exported chat template does not reproduce the training prompt's token ids "
                f"with this tokenizer ({type(processor.tokenizer).__name__}): {ids} != {training}"
            )
