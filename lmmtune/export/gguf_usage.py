"""The files beside a GGUF export's weights: an Ollama Modelfile and a README with the commands
for llama.cpp (`llama-mtmd-cli`), llama-cpp-python, Ollama and LM Studio.

Each renders LLaVA 1.5's training prompt (Vicuna v1: the system line, `USER: <image>\\n...
ASSISTANT:`, `</s>` after answers): llama-cpp-python's own `Llava15ChatHandler` puts the
image and line breaks elsewhere and has another system line, so the README's snippet
overrides its template.
"""

from __future__ import annotations

from pathlib import Path

from lmmtune.data.prompt import EOS, SYSTEM_PROMPT

MODELFILE = "Modelfile"
README = "README.md"

OLLAMA_TEMPLATE = (
    "{{- if .System }}{{ .System }} {{ end }}"
    "{{- range .Messages }}"
    '{{- if eq .Role "user" }}USER: {{ .Content }} ASSISTANT:'
    '{{- else if eq .Role "assistant" }} {{ .Content }}' + EOS + "{{ end }}"
    "{{- end }}"
)

MEDIA_MARKER = "<__media__>"
"""Where llama.cpp (mtmd) puts an image's embeddings in a prompt."""
_SYSTEM = SYSTEM_PROMPT.replace("'", "\\'")
# The chat template written into the GGUF, for llama.cpp's own chat (llama-mtmd-cli,
# llama-server, LM Studio): the training prompt with the image marker where `<image>` was,
# then a line break. No BOS (llama.cpp adds it) and no space after it: llama.cpp puts a "▁"
# before every text piece itself (transformers' template writes them as spaces instead).
LLAMA_CPP_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{- '" + _SYSTEM + "' -}}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' USER: ' if loop.first else 'USER: ') + (message['content']"
    " | replace('" + MEDIA_MARKER + "\n', '" + MEDIA_MARKER + "')"
    " | replace('" + MEDIA_MARKER + "', '" + MEDIA_MARKER + "\n')) + ' ASSISTANT:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] + '" + EOS + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# llama-cpp-python's chat handler with the training prompt; rendered into the README.
LLAMA_CPP_PYTHON = '''\
from pathlib import Path

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler


class VicunaV1Handler(Llava15ChatHandler):
    """LLaVA 1.5's training prompt: SYSTEM USER: <image>\\\\nQUESTION ASSISTANT: ANSWER</s>"""

    DEFAULT_SYSTEM_MESSAGE = "{system}"
    CHAT_FORMAT = (
        "{{% for message in messages %}}"
        "{{% if message.role == 'system' %}}{{{{ message.content }}}} {{% endif %}}"
        "{{% if message.role == 'user' %}}USER: "
        "{{% if message.content is string %}}{{{{ message.content }}}}{{% else %}}"
        "{{% for part in message.content if part.type == 'image_url' %}}"
        "{{{{ part.image_url.url if part.image_url is mapping else part.image_url }}}}\\n"
        "{{% endfor %}}"
        "{{% for part in message.content if part.type == 'text' %}}{{{{ part.text }}}}{{% endfor %}}"
        "{{% endif %}} ASSISTANT:{{% endif %}}"
        "{{% if message.role == 'assistant' %}} {{{{ message.content }}}}</s>{{% endif %}}"
        "{{% endfor %}}"
    )


llm = Llama(
    model_path="{model}",
    chat_handler=VicunaV1Handler(clip_model_path="{mmproj}", verbose=False),
    n_ctx=2048,
    verbose=False,
)
image = Path("scan.png").resolve().as_uri()
reply = llm.create_chat_completion(
    messages=[
        {{
            "role": "user",
            "content": [
                {{"type": "image_url", "image_url": {{"url": image}}}},
                {{"type": "text", "text": "Which side is the lesion on?"}},
            ],
        }}
    ],
    temperature=0.0,
    max_tokens=64,
)
print(reply["choices"][0]["message"]["content"].strip())
'''

README_TEXT = """\
# LLaVA 1.5 (adapted with lmmtune) for llama.cpp, LM Studio and Ollama

| file | what |
|---|---|
| `{model}` | the language model (Vicuna with the adapter merged), {gguf_type} |
| `{mmproj}` | the vision tower and the trained projector (CLIP ViT, f16), with the image mean and std training used |
| `Modelfile` | Ollama: both files, the training prompt (Vicuna v1), stop at `</s>` |
| `export_report.json` | what was converted, sizes, the merge's parity check |

The model was trained on the Vicuna v1 prompt: `{system} USER: <image>\\nQUESTION
ASSISTANT:`; each runtime below is set up to send it. llama.cpp resizes and pads images
itself (bicubic, then padded to a square with the mean colour), not exactly as training
did; and llama.cpp's LLaVA graph (llama-cpp-python 0.3.36 and the llama.cpp of its time)
shifts the image tokens by one patch (ggml-org/llama.cpp#25814). Expect answers that rest
on fine image detail to differ now and then from the model in transformers (measured in
lmmtune's docs/eval_export.md).

## llama.cpp

```bash
llama-mtmd-cli -m {model} --mmproj {mmproj} --image scan.png \\
    -p "Which side is the lesion on?" --temp 0
```

(`llama-server -m {model} --mmproj {mmproj}` serves the same over an OpenAI-style API.)

## llama-cpp-python

`pip install llama-cpp-python` (it compiles llama.cpp), then:

```python
{llama_cpp_python}```

## Ollama

```bash
ollama create my-llava -f Modelfile
ollama run my-llava "Which side is the lesion on? ./scan.png"
```

## LM Studio

Copy this folder into LM Studio's models folder as `PUBLISHER/MODEL/` (for example
`~/.lmstudio/models/me/my-llava/`): it finds the model and, by its `mmproj` name, the
vision file beside it; then attach an image in the chat. Set the prompt template to the
Vicuna v1 format above if the chat answers poorly.
"""


def modelfile_text(model: str, mmproj: str) -> str:
    """An Ollama Modelfile: the language model, then the projector, the training prompt, greedy."""
    return (
        f"FROM ./{model}\n"
        f"FROM ./{mmproj}\n"
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
        f'SYSTEM """{SYSTEM_PROMPT}"""\n'
        f'PARAMETER stop "{EOS}"\n'
        "PARAMETER temperature 0\n"
        "PARAMETER num_ctx 2048\n"
    )


def llama_cpp_python_example(model: str, mmproj: str) -> str:
    """The README's llama-cpp-python snippet for these file names."""
    return LLAMA_CPP_PYTHON.format(system=SYSTEM_PROMPT, model=model, mmproj=mmproj)


def write_usage_files(folder: Path, model: str, mmproj: str) -> None:
    """The Modelfile and the README beside the GGUF files."""
    (folder / MODELFILE).write_text(modelfile_text(model, mmproj))
    gguf_type = model.removeprefix("model-").removesuffix(".gguf")
    (folder / README).write_text(
        README_TEXT.format(
            model=model,
            mmproj=mmproj,
            gguf_type=gguf_type,
            system=SYSTEM_PROMPT,
            llama_cpp_python=llama_cpp_python_example(model, mmproj),
        )
    )
