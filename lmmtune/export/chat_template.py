"""The processor an export ships: LLaVA 1.5's own prompt and image padding, for plain transformers.

The llava-hf chat template differs from what LLaVA 1.5 (and lmmtune) trains on: no
system line, no `</s>` after answers. The template below renders exactly
`lmmtune.data.template.render_conversation`:

    <s>SYSTEM USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

and the image processor pads to a square with the mean colour before resizing
(`do_pad`), as lmmtune's training does, instead of centre-cropping the edges away.
"""

from __future__ import annotations

from transformers import LlavaImageProcessorPil, LlavaProcessor

from lmmtune.data.template import SYSTEM_PROMPT

_TEXT = "selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')"
_SYSTEM = SYSTEM_PROMPT.replace("'", "\\'")

# Literal text is written as {{- '...' -}} so that the whitespace control of the tags
# around it never eats a space the prompt needs.
VICUNA_V1_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
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
    "{%- for item in content if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
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

_IMAGE_SETTINGS = (
    "size",
    "crop_size",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
    "do_convert_rgb",
)


def export_processor(processor) -> LlavaProcessor:
    """The training processor with a padding image processor and the Vicuna v1 chat template."""
    settings = processor.image_processor.to_dict()
    image_processor = LlavaImageProcessorPil(
        **{key: settings[key] for key in _IMAGE_SETTINGS if key in settings}, do_pad=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )
