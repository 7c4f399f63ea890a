"""`python -m lmmtune export output_dir=RUN export.format=gguf`: the model for llama.cpp,
LM Studio and Ollama.

Writes RUN/export-gguf (or `export.dir`): the language model as `model-<type>.gguf`
(`export.gguf_type`: f16, q8_0, q4_k_m), LLaVA 1.5's vision tower and trained projector as
`mmproj-model-f16.gguf` with the image mean and std training used, an Ollama `Modelfile`
and a README with the commands for llama.cpp, llama-cpp-python, Ollama and LM Studio.
From a run the adapter is merged first (as `export.format=merged` does, parity checked);
`export.model=DIR` converts a merged export as it is. llama.cpp's own converters write
the files (`lmmtune.export.gguf_tools`); lmmtune only lays out their input: the text
model folder with a SentencePiece tokenizer.model (`gguf_vocab`), and the vision tower
as a CLIP folder plus LLaVA's projector file, which is what the legacy converter reads.
The folder follows the export rules: staged, renamed into place when complete, never
overwritten without `export.overwrite=true`. It is not logged to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmmtune.errors import LmmtuneError
from lmmtune.export.gguf_tools import (
    CONVERTER_TYPES,
    TOKENIZER_MODEL,
    GgufTools,
    added_tokens,
    find_tools,
    provide_tokenizer_model,
)
from lmmtune.export.gguf_usage import LLAMA_CPP_CHAT_TEMPLATE, write_usage_files
from lmmtune.export.processor import export_processor
from lmmtune.export.run import (
    REPORT,
    check_target,
    export_merged,
    mark_export,
    parity_failure,
    portable_path,
)
from lmmtune.finished_run import load_finished_run
from lmmtune.rundir.files import require_safetensors, staged_directory
from lmmtune.rundir.run import RunDir

log = logging.getLogger(__name__)

MODEL_FILE = "model-{gguf_type}.gguf"
MMPROJ_FILE = "mmproj-model-f16.gguf"
STAGING = (".merged", ".text-input", ".vision-input", ".converted")
"""Working folders inside the staged export, removed before it is renamed into place."""
GGUF_DTYPE = "float16"
"""Merge dtype when export.dtype is null: the GGUF's own precision (bf16 would round LoRA updates)."""


@dataclass
class GgufSource:
    """What a GGUF export converts: a merged folder, or a run whose adapter `merge` writes."""

    target: Path
    protected: list[Path]
    name: str
    model_dir: Path | None = None
    merge: Callable[[Path], dict] | None = None
    base_dirs: list[Path] = field(default_factory=list)
    """Folders that may hold the base model's tokenizer.model."""


def run_gguf_export(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Write the GGUF export configured in `cfg.export`; return its report."""
    export_cfg = cfg.export
    source = merged_source(export_cfg) if export_cfg.model else run_source(cfg, overrides)
    check_target(source.target, export_cfg.overwrite, source.protected)
    tools = find_tools(export_cfg.gguf_type, export_cfg.llama_cpp_dir)  # before anything is written
    report: dict = {
        "format": "gguf",
        "gguf_type": str(export_cfg.gguf_type),
        "source": portable_path(source.model_dir or source.protected[-1], source.target),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with staged_directory(source.target, export_cfg.overwrite, marked=True) as tmp:
        model_dir = source.model_dir
        if model_dir is None:
            model_dir = tmp / ".merged"
            report["merge"] = source.merge(model_dir)
        report.update(write_gguf_files(model_dir, tmp, tools, export_cfg.gguf_type, source))
        for working in STAGING:
            shutil.rmtree(tmp / working, ignore_errors=True)
        write_usage_files(tmp, MODEL_FILE.format(gguf_type=export_cfg.gguf_type), MMPROJ_FILE)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        mark_export(tmp)
    log.info("GGUF export written to %s", source.target)
    return report


def merged_source(export_cfg) -> GgufSource:
    """`export.model=DIR`: a merged export (any llava-hf LLaVA 1.5 folder), converted as it is."""
    model = Path(export_cfg.model)
    if not (model / "config.json").is_file():
        raise LmmtuneError(
            f"export.model={model} holds no config.json: pass a merged export "
            "(python -m lmmtune export output_dir=RUN writes RUN/export-merged)"
        )
    require_safetensors(model, "export.model")
    target = Path(export_cfg.dir) if export_cfg.dir else model.parent / "export-gguf"
    return GgufSource(target, protected=[model], name=model.name, model_dir=model)


def run_source(cfg: DictConfig, overrides: list[str] | None) -> GgufSource:
    """A run (or `export.adapter`): merged into its unquantized base first, parity checked."""
    export_cfg = cfg.export
    run = load_finished_run(cfg, adapter=export_cfg.adapter, overrides=overrides)
    target = Path(export_cfg.dir) if export_cfg.dir else RunDir(run.folder).export("gguf")
    merge_cfg = OmegaConf.merge(export_cfg, {"dtype": export_cfg.dtype or GGUF_DTYPE})

    def merge(folder: Path) -> dict:
        merged = export_merged(run, folder, export_processor(run.processor), merge_cfg)
        if "parity" in merged and not merged["parity"]["passed"]:
            raise LmmtuneError(parity_failure(merged["parity"]))
        return merged

    return GgufSource(
        target,
        [run.folder, run.adapter],
        run.settings.name,
        merge=merge,
        base_dirs=local_base(run.settings),
    )


def local_base(settings: DictConfig) -> list[Path]:
    """The base model's folder on this machine (a hub id's cached snapshot), if any."""
    from lmmtune.model import resolve_model_path

    try:
        path = Path(resolve_model_path(settings.model))
    except LmmtuneError:
        return []
    return [path] if path.is_dir() else []


def write_gguf_files(
    model_dir: Path, folder: Path, tools: GgufTools, gguf_type: str, source: GgufSource
) -> dict:
    """The language model and the mmproj GGUF files in `folder`; what was written."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    text_input = stage_text_model(model_dir, folder / ".text-input", processor, source.base_dirs)
    model_file = folder / MODEL_FILE.format(gguf_type=gguf_type)
    convert_text_model(text_input["folder"], model_file, tools, gguf_type, source.name)
    vision_input = stage_image_encoder(model_dir, folder / ".vision-input")
    mmproj = convert_image_encoder(vision_input, folder, tools, processor.image_processor)
    return {
        "tokenizer_model": text_input["tokenizer_model"],
        "files": {path.name: describe_gguf(path) for path in (model_file, mmproj)},
    }


def stage_text_model(model_dir: Path, staging: Path, processor, base_dirs: list[Path]) -> dict:
    """The converter's input: the merged folder's weights and config (linked), a SentencePiece
    tokenizer.model, `added_tokens.json` (`<image>`, `<pad>`) and llama.cpp's chat template."""
    staging.mkdir(parents=True)
    replaced = (TOKENIZER_MODEL, "added_tokens.json", "tokenizer_config.json", "config.json")
    for item in model_dir.iterdir():
        if item.is_file() and item.name not in replaced and item.suffix != ".jinja":
            (staging / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    # The converter picks its model class by `architectures`, which LlavaConfig.save_pretrained
    # alone (a config written without a model) leaves out.
    config.setdefault("architectures", ["LlavaForConditionalGeneration"])
    (staging / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)  # it would win over chat_template.jinja
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (staging / "chat_template.jinja").write_text(LLAMA_CPP_CHAT_TEMPLATE)
    origin = provide_tokenizer_model(model_dir, base_dirs, staging, processor.tokenizer)
    from sentencepiece import SentencePieceProcessor

    pieces = SentencePieceProcessor(model_file=str(staging / TOKENIZER_MODEL)).vocab_size()
    extra = added_tokens(model_dir / "tokenizer.json", pieces)
    (staging / "added_tokens.json").write_text(json.dumps(extra))
    return {"folder": staging, "tokenizer_model": origin}


def convert_text_model(
    model_dir: Path, target: Path, tools: GgufTools, gguf_type: str, name: str
) -> None:
    """llama.cpp's convert_hf_to_gguf.py: f16 and q8_0 itself, other types quantized from f16."""
    converter_type = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
    converted = (
        target if gguf_type in CONVERTER_TYPES else target.parent / ".converted" / "f16.gguf"
    )
    converted.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(tools.text_converter), str(model_dir), "--outfile"]
    command += [str(converted), "--outtype", converter_type, "--model-name", name]
    run_converter(command, "convert_hf_to_gguf.py")
    if converted != target:
        tools.quantize(converted, target, target.name)
        converted.unlink()


def stage_image_encoder(model_dir: Path, staging: Path) -> Path:
    """The legacy converter's input: the vision tower as a CLIPVisionModel folder (float32)
    and LLaVA's projector file, from the merged model's tensors. Any key layout: transformers
    5.24 saves `vision_tower.embeddings.*`, llava-hf's hub files (4.x) have
    `vision_tower.vision_model.embeddings.*`, a `model.` prefix may come first."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise LmmtuneError(
            f"{model_dir}: vision_feature_select_strategy "
            f"{config['vision_feature_select_strategy']!r}; llama.cpp's LLaVA 1.5 runs 'default'"
        )
    vision = {**config["vision_config"], "model_type": "clip_vision_model", "dtype": "float32"}
    vision.update(architectures=["CLIPVisionModel"], torch_dtype="float32")
    vision["vision_feature_layer"] = config.get("vision_feature_layer", -2)
    tower, projector = {}, {}
    for name, tensor in model_tensors(model_dir, ("vision_tower.", "multi_modal_projector.")):
        if name.startswith("vision_tower."):
            inner = name.removeprefix("vision_tower.").removeprefix("vision_model.")
            tower[inner] = tensor.float().contiguous()
        else:
            projector[name] = tensor.float().contiguous()
    if not tower or not projector:
        raise LmmtuneError(f"{model_dir} holds no vision tower or projector weights")
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps(vision, indent=1))
    save_file(tower, staging / "model.safetensors", metadata={"format": "pt"})
    torch.save(projector, staging / "llava.projector")
    return staging


def model_tensors(model_dir: Path, prefixes: tuple[str, ...]) -> Iterator[tuple[str, object]]:
    """The safetensors tensors whose names (without a leading `model.`) start with `prefixes`;
    the others are never read (a 7B language model stays on disk)."""
    from safetensors import safe_open

    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is no dict
                name = re.sub(r"^model\.", "", key)
                if name.startswith(prefixes):
                    yield name, weights.get_tensor(key)


def convert_image_encoder(staging: Path, folder: Path, tools: GgufTools, image_processor) -> Path:
    """llama.cpp's legacy convert_image_encoder_to_gguf.py: LLaVA 1.5's mmproj in f16, with the
    image mean and std of the processor training used."""
    command = [sys.executable, "-m", "lmmtune.export.gguf_tools"]
    command += [str(tools.image_encoder_converter), "-m", str(staging)]
    command += ["--clip-model-is-vision", "--llava-projector", str(staging / "llava.projector")]
    command += ["--output-dir", str(staging), "--projector-type", "mlp"]
    command += ["--image-mean", *map(str, image_processor.image_mean)]
    command += ["--image-std", *map(str, image_processor.image_std)]
    # The gguf-py this llama.cpp's scripts expect first, then lmmtune (the runner) and the rest.
    paths = [tools.llama_cpp / "gguf-py", Path(__file__).parents[2], os.environ.get("PYTHONPATH")]
    python_path = os.pathsep.join(str(path) for path in paths if path)
    run_converter(command, "convert_image_encoder_to_gguf.py", {"PYTHONPATH": python_path})
    target = folder / MMPROJ_FILE
    (staging / "mmproj-model-f16.gguf").rename(target)
    return target


def run_converter(command: list[str], name: str, env: dict | None = None) -> None:
    """Run one of llama.cpp's converter scripts; its last lines in the error if it fails."""
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LmmtuneError(f"llama.cpp's {name} failed: {tail}")
    log.info("%s done in %.0f s", name, time.perf_counter() - started)


def describe_gguf(path: Path) -> dict:
    """Size, tensor count and architecture of a written GGUF (read back with the gguf package)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field_ = reader.get_field("general.architecture")
    architecture = field_.contents() if field_ is not None else None
    return {
        "bytes": path.stat().st_size,
        "tensors": len(reader.tensors),
        "architecture": architecture,
    }
