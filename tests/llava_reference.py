"""LLaVA 1.5's own preprocessing, rewritten for tests: `tokenizer_image_token` + `preprocess_v1`.

From haotian-liu/LLaVA (llava/mm_utils.py, llava/train/train.py, conv_vicuna_v1): the
text chunks around `<image>` are tokenized separately (BOS kept once), and labels are
found by re-tokenizing each round and its instruction. `tokenize(text)` plays LLaVA's
`tokenizer(text).input_ids`: the real Llama-2 tokenizer with `legacy=false` (a `▁` at
the start of the text, none after special tokens), the setting of LLaVA's current code.
"""

from __future__ import annotations

from lmmtune.data.prompt import SYSTEM_PROMPT

IGNORE_INDEX = -100
IMAGE_INDEX = -200
SEP = " ASSISTANT: "


def conversation_v1(turns: list[tuple[str, str]], has_image: bool) -> str:
    """conv_vicuna_v1.get_prompt(), with `<image>\\n` in front of the first question."""
    text = SYSTEM_PROMPT + " "
    for index, (question, answer) in enumerate(turns):
        if index == 0 and has_image:
            question = "<image>\n" + question
        text += f"USER: {question} ASSISTANT: {answer}</s>"
    return text


def tokenizer_image_token(prompt: str, tokenize) -> list[int]:
    chunks = [tokenize(chunk) for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == 1:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [IMAGE_INDEX] * (offset + 1))][:-1]
    for part in separated:
        ids.extend(part[offset:])
    return ids


def preprocess_v1(turns, has_image: bool, tokenize, image_id: int, image_tokens: int):
    """(input_ids, labels) as LLaVA 1.5 trains them, the image index expanded to its tokens."""
    conversation = conversation_v1(turns, has_image)
    encode = (lambda text: tokenizer_image_token(text, tokenize)) if has_image else tokenize
    ids = encode(conversation)
    labels = list(ids)
    cur = 1
    labels[:cur] = [IGNORE_INDEX]
    for index, round_text in enumerate(conversation.split("</s>")):
        if round_text == "":
            break
        parts = round_text.split(SEP)
        if len(parts) != 2:
            break
        round_len = len(encode(round_text))
        instruction_len = len(encode(parts[0] + SEP)) - 2
        if index != 0:  # LLaVA's correction for a non-legacy tokenizer
            round_len -= 1
            instruction_len -= 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids), (
        f"LLaVA would drop this sample: tokenization mismatch {cur} vs {len(ids)}"
    )
    return _expand_image(ids, labels, image_id, image_tokens)


def _expand_image(ids, labels, image_id: int, image_tokens: int):
    """The image index -> `image_tokens` image ids, labelled -100 (as LLaVA's model does it)."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels, strict=True):
        if token == IMAGE_INDEX:
            out_ids += [image_id] * image_tokens
            out_labels += [IGNORE_INDEX] * image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


PLAIN_SEP = "\n"
"""conv_llava_plain's separator: what LLaVA's stage 1 puts after each caption."""


def preprocess_plain(question: str, caption: str, tokenize, image_id: int, image_tokens: int):
    """(input_ids, labels) of LLaVA's stage 1 (`preprocess_plain`, llava/train/train.py): the
    human turn replaced by `<image>` alone, `<image>` + caption + sep tokenized as
    `tokenizer_image_token` does, the first `len(tokenizer_image_token('<image>'))` labels
    (BOS and the image) masked; the image index expanded as LLaVA's model does it."""
    assert "<image>" in question  # LLaVA asserts it too
    human = "<image>"
    ids = tokenizer_image_token(human + caption + PLAIN_SEP, tokenize)
    labels = list(ids)
    masked = len(tokenizer_image_token(human, tokenize))
    labels[:masked] = [IGNORE_INDEX] * masked
    return _expand_image(ids, labels, image_id, image_tokens)
