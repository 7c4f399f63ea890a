"""`export.format=gguf` without running llama.cpp: refusals before anything is written, the
tokenizer.model written for the converter, the mmproj converter's input, the usage files.
(llama.cpp itself checks the exports in tests/export/test_gguf_llama_cpp.py, `slow`.)"""

from __future__ import annotations

import ast
import json
import re
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from lmmtune.errors import LmmtuneError
from lmmtune.export.gguf import run_gguf_export, stage_image_encoder
from lmmtune.export.gguf_tools import PROBES, check_same_tokens, llama_sentencepiece_model
from lmmtune.export.gguf_usage import modelfile_text, write_usage_files
from lmmtune.rundir.folders import read_manifest
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli
from tests.real_tokenizer import real_processor, real_processor_dir


def gguf_config(tmp_path, *overrides):
    return compose_config(
        [f"output_dir={tmp_path / 'run'}", "tracking=none", "export.format=gguf", *overrides]
    )


def test_an_unknown_gguf_type_is_refused_at_composition(tmp_path):
    done = run_cli(["export", "export.format=gguf", "export.gguf_type=q5_k"], cwd=tmp_path)
    assert done.returncode != 0
    assert "q5_k" in done.stderr and "q4_k_m" in done.stderr  # Hydra lists the choices
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())


def test_export_model_needs_the_gguf_format(tmp_path):
    cfg = compose_config(["export.model=somewhere", "export.format=merged"])
    with pytest.raises(LmmtuneError, match=r"export.model .* needs export.format=gguf"):
        validate(cfg, "export")


def test_q4_k_m_without_llama_cpp_is_refused_before_anything_is_written(
    tmp_path, tiny_model_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    target = tmp_path / "gguf"
    cfg = gguf_config(
        tmp_path,
        f"export.model={tiny_model_path}",
        f"export.dir={target}",
        "export.gguf_type=q4_k_m",
    )
    with pytest.raises(LmmtuneError) as refused:
        run_gguf_export(cfg)
    message = str(refused.value)
    assert "export.gguf_type=q4_k_m" in message and "pip install llama-cpp-python==" in message
    assert not target.exists() and not list(tmp_path.glob(".gguf*"))


def test_missing_converter_packages_name_the_extra_to_install(
    tmp_path, tiny_model_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    cfg = gguf_config(tmp_path, f"export.model={tiny_model_path}", f"export.dir={tmp_path / 'g'}")
    with pytest.raises(LmmtuneError, match=re.escape("pip install 'lmmtune[gguf]'")):
        run_gguf_export(cfg)
    assert not (tmp_path / "g").exists()


def test_a_folder_of_yours_or_an_earlier_export_is_never_overwritten(tmp_path, tiny_model_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    cfg = gguf_config(tmp_path, f"export.model={tiny_model_path}", f"export.dir={mine}")
    with pytest.raises(LmmtuneError, match="was not made by lmmtune export"):
        run_gguf_export(cfg)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / ".lmmtune.json").write_text(json.dumps({"kind": "export", "files": ["a.gguf"]}))
    (earlier / "a.gguf").write_text("x")
    cfg = gguf_config(tmp_path, f"export.model={tiny_model_path}", f"export.dir={earlier}")
    with pytest.raises(LmmtuneError, match="export.overwrite=true"):
        run_gguf_export(cfg)
    assert (mine / "notes.txt").read_text() == "keep" and (earlier / "a.gguf").read_text() == "x"
    assert read_manifest(earlier)["files"] == ["a.gguf"]


def test_export_model_must_be_a_model_folder(tmp_path):
    cfg = gguf_config(tmp_path, f"export.model={tmp_path}")
    with pytest.raises(LmmtuneError, match="holds no config.json"):
        run_gguf_export(cfg)


def test_tokenizer_model_written_for_llama_cpp_splits_text_as_transformers():
    """Llama-2's vocabulary as SentencePiece: every merge ranked, byte fallback, specials."""
    from sentencepiece import SentencePieceProcessor

    tokenizer = real_processor(False).tokenizer
    model = llama_sentencepiece_model(real_processor_dir(False) / "tokenizer.json")
    check_same_tokens(model, tokenizer, real_processor_dir(False))  # raises on a difference
    derived = SentencePieceProcessor(model_proto=model)
    assert derived.vocab_size() == 32000 and derived.encode("Hello world") == [15043, 3186]
    assert derived.IsControl(2) and derived.IsUnknown(0) and derived.IsByte(3 + 0x0A)
    sentences = [p for p in PROBES] + ["The lesion is on the left side of the T1 scan."]
    for text in sentences:
        assert derived.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_is_not_llamas_is_refused_with_the_reason(tiny_model_path):
    with pytest.raises(LmmtuneError, match="not a Llama SentencePiece tokenizer"):
        llama_sentencepiece_model(tiny_model_path / "tokenizer.json")


@pytest.mark.parametrize("layout", ["transformers 5.24", "llava-hf hub (4.x)"])
def test_image_encoder_input_is_the_tower_and_projector_of_the_merged_model(
    tmp_path, tiny_model_path, layout
):
    """The vision tower as CLIPVisionModel's weights and LLaVA's projector file, whichever key
    layout the merged folder has: transformers 5.24 saves `vision_tower.embeddings.*`
    (`language_model.model.*` for the text side), llava-hf's hub files
    `vision_tower.vision_model.embeddings.*`."""
    weights = load_file(tiny_model_path / "model.safetensors")
    source = tmp_path / "merged"
    source.mkdir()
    (source / "config.json").write_bytes((tiny_model_path / "config.json").read_bytes())
    if layout != "transformers 5.24":
        renamed = {
            re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v
            for k, v in weights.items()
        }
        save_file(renamed, source / "model.safetensors")
    else:
        assert "vision_tower.embeddings.patch_embedding.weight" in weights  # as 5.24 saved it
        save_file(weights, source / "model.safetensors")
    staged = stage_image_encoder(source, tmp_path / "vision")
    tower = load_file(staged / "model.safetensors")
    projector = torch.load(staged / "llava.projector")
    key = "embeddings.patch_embedding.weight"
    assert torch.equal(tower[key], weights[f"vision_tower.{key}"].float())
    assert len(tower) == sum(k.startswith("vision_tower.") for k in weights)
    assert sorted(projector) == [
        f"multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("bias", "weight")
    ]
    assert torch.equal(
        projector["multi_modal_projector.linear_2.weight"],
        weights["multi_modal_projector.linear_2.weight"].float(),
    )
    config = json.loads((staged / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and config["vision_feature_layer"] == -2
    assert config["image_size"] == 56 and not any(k.startswith("text") for k in config)


def test_usage_files_name_both_files_the_training_prompt_and_the_stop_token(tmp_path):
    write_usage_files(tmp_path, "model-q4_k_m.gguf", "mmproj-model-f16.gguf")
    modelfile = (tmp_path / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ./model-q4_k_m.gguf", "FROM ./mmproj-model-f16.gguf"]
    assert 'PARAMETER stop "</s>"' in modelfile
    assert any(line.startswith('SYSTEM """A chat between a curious user') for line in modelfile)
    assert "USER: {{ .Content }} ASSISTANT:" in modelfile_text("m", "p")
    readme = (tmp_path / "README.md").read_text()
    for needle in (
        "llama-mtmd-cli -m model-q4_k_m.gguf --mmproj mmproj-model-f16.gguf",
        "ollama create",
        "LM Studio",
        "VicunaV1Handler",
    ):
        assert needle in readme
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    ast.parse(snippet)  # the llama-cpp-python example is valid Python (run in the slow test)


def test_gguf_settings_compose_with_their_defaults():
    cfg = compose_config(["export.format=gguf"])
    assert (cfg.export.gguf_type, cfg.export.model, cfg.export.llama_cpp_dir) == ("f16", None, None)
    assert OmegaConf.select(cfg, "export.format") == "gguf"


def test_llama_cpp_chat_template_renders_the_training_prompt():
    """The GGUF's template (llama.cpp's chat, LM Studio): LLaVA 1.5's prompt, the image marker
    where training has `<image>`, a line break after it whether or not the user wrote one."""
    import jinja2

    from lmmtune.data.prompt import render_conversation, render_prompt
    from lmmtune.export.gguf_usage import LLAMA_CPP_CHAT_TEMPLATE, MEDIA_MARKER

    template = jinja2.Environment().from_string(LLAMA_CPP_CHAT_TEMPLATE)
    question = "Which side is the lesion on?"
    expected = render_prompt(question, True, MEDIA_MARKER)
    for content in (MEDIA_MARKER + question, f"{MEDIA_MARKER}\n{question}"):
        assert template.render(messages=[{"role": "user", "content": content}]) == expected
    turns = [
        {"role": "user", "content": MEDIA_MARKER + question},
        {"role": "assistant", "content": "left"},
        {"role": "user", "content": "Is it large?"},
    ]
    rendered = render_conversation([(question, "left"), ("Is it large?", "")], True, MEDIA_MARKER)
    assert template.render(messages=turns) == rendered.text[: rendered.answer_spans[-1][0]]


def test_without_pypi_the_converters_are_refused_naming_the_offline_option(tmp_path, monkeypatch):
    from lmmtune.export.gguf_tools import find_tools

    monkeypatch.setenv("LMMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(
        LmmtuneError, match=r"could not fetch llama.cpp's converters .*llama_cpp_dir"
    ):
        find_tools("f16", None)
    assert not any((tmp_path / "cache").glob("llama.cpp-*"))
    with pytest.raises(LmmtuneError, match=r"has no convert_hf_to_gguf.py"):
        find_tools("f16", str(tmp_path))
