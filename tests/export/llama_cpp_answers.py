"""What llama.cpp itself (through llama-cpp-python) makes of a GGUF export: run as a script in a
process with the cached llama-cpp-python on PYTHONPATH (tests/export/gguf_helpers.py).

    python llama_cpp_answers.py MODEL MMPROJ QUESTIONS.jsonl OUT.json [--max-new-tokens N]

For each question (`image`, `question`) it renders the prompt as llama-mtmd-cli does (the
image marker, then the question, through the GGUF's own chat template, here with Python's
jinja2), lets mtmd tokenize it with the image, evaluates it, and records: the text token ids, the
number of image positions, the first token's logits (OUT.npy, one row per question), the
greedy answer (ids and text, stopping at `</s>`), and llama.cpp's image embedding of the
question's image (OUT.embeddings.npy, for the first question of each image only).
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import jinja2
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
from llama_cpp import Llama


def open_mtmd(llm: Llama, mmproj: str):
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = llm.n_threads
    params.print_timings = False
    context = mtmd.mtmd_init_from_file(mmproj.encode(), llm.model, params)
    assert context is not None, f"llama.cpp could not load {mmproj}"
    return context


def tokenize(context, text: str, image: Path):
    bitmap = mtmd.mtmd_helper_bitmap_init_from_file(context, str(image).encode(), False)
    assert bitmap is not None, f"llama.cpp could not read {image}"
    encoded = text.encode()
    inputs = mtmd.mtmd_input_text()
    inputs.text, inputs.text_len, inputs.add_special, inputs.parse_special = (
        encoded,
        len(encoded),
        True,
        True,
    )
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    assert mtmd.mtmd_tokenize(context, chunks, ctypes.byref(inputs), bitmaps, 1) == 0
    mtmd.mtmd_bitmap_free(bitmap)
    return chunks


def evaluate(llm: Llama, context, chunks) -> dict:
    """Feed the chunks (text tokens, image embeddings) into the model; what went in."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    text_ids, image_tokens, embedding = [], 0, None
    for index in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, index)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            count = ctypes.c_size_t()
            pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
            tokens = [pointer[i] for i in range(count.value)]
            text_ids += tokens
            llm.eval(tokens)
            continue
        image_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        assert mtmd.mtmd_encode_chunk(context, chunk) == 0
        values = mtmd.mtmd_get_output_embd(context)
        embedding = np.ctypeslib.as_array(values, shape=(image_tokens * llm.n_embd(),)).copy()
        position = llama_cpp.llama_pos(0)
        status = mtmd.mtmd_helper_eval_chunk_single(
            context,
            llm._ctx.ctx,
            chunk,
            llama_cpp.llama_pos(llm.n_tokens),
            llama_cpp.llama_seq_id(0),
            llm.n_batch,
            False,
            ctypes.byref(position),
        )
        assert status == 0
        llm.n_tokens = position.value
    return {
        "text_ids": text_ids,
        "image_tokens": image_tokens,
        "embedding": embedding.reshape(image_tokens, -1),
    }


def last_logits(llm: Llama) -> np.ndarray:
    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def greedy(llm: Llama, first: np.ndarray, max_new_tokens: int) -> list[int]:
    answer, logits = [], first
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits))
        if token == llm.token_eos():
            break
        answer.append(token)
        llm.eval([token])
        logits = last_logits(llm)
    return answer


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "mmproj", "questions", "out"):
        parser.add_argument(name)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    llm = Llama(args.model, n_ctx=2048, n_batch=1024, n_threads=2, seed=0, verbose=False)
    context = open_mtmd(llm, args.mmproj)
    marker = mtmd.mtmd_default_marker().decode()
    template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])
    questions = [json.loads(line) for line in Path(args.questions).read_text().splitlines()]
    results, logits, embeddings, seen = [], [], [], set()
    for item in questions:
        # As llama-mtmd-cli does: the marker before the question, the GGUF's chat template.
        message = {"role": "user", "content": marker + item["question"]}
        prompt = template.render(messages=[message], add_generation_prompt=True)
        chunks = tokenize(context, prompt, Path(item["image"]))
        fed = evaluate(llm, context, chunks)
        mtmd.mtmd_input_chunks_free(chunks)
        first = last_logits(llm)
        answer = greedy(llm, first, args.max_new_tokens)
        logits.append(first)
        if item["image"] not in seen:
            seen.add(item["image"])
            embeddings.append(fed["embedding"])
        results.append(
            {
                "text_ids": fed["text_ids"],
                "image_tokens": fed["image_tokens"],
                "answer_ids": answer,
                "answer": llm.detokenize(answer).decode(errors="replace").strip(),
            }
        )
    out = Path(args.out)
    out.write_text(json.dumps(results))
    np.save(out.with_suffix(".npy"), np.stack(logits))
    np.save(out.with_suffix(".embeddings.npy"), np.stack(embeddings))


if __name__ == "__main__":
    main()
