"""`recipe=demo model.projector=...`: stage 2 from an aligned projector, through the command
line. A wrong projector refuses the run before anything is written; a right one is the base's
projector for eval "before", and the merged export carries it (peft.train_projector=false)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lmmtune.model_projector import ALIGNED_COPY, LLAVA_KEYS
from tests.conftest import run_cli

SHORT = [
    "recipe=demo",
    "data.demo_size=48",
    "data.max_eval_samples=8",
    "train.max_steps=3",
    "eval.after=false",
    "data.num_workers=0",
]


def write_llava_projector(folder: Path, seed: int = 7) -> tuple[Path, dict]:
    """LLaVA's mm_projector.bin for the tiny model (std-1 weights, far from its own); the
    weights by the projector module's names."""
    from transformers import AutoConfig

    from lmmtune.demo import tiny_model_dir
    from lmmtune.model_projector import expected_shapes

    shapes = expected_shapes(AutoConfig.from_pretrained(tiny_model_dir()))
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
    path = folder / "mm_projector.bin"
    torch.save({llava: weights[name] for llava, name in LLAVA_KEYS.items()}, path)
    return path, weights


def test_a_wrong_projector_refuses_the_run_before_anything_is_written(tmp_path):
    """In process (what the command line runs): refused in one line, no run folder left."""
    from lmmtune.api import finetune
    from lmmtune.errors import LmmtuneError
    from tests.conftest import compose_config

    source, weights = write_llava_projector(tmp_path)
    torch.save({"model.mm_projector.0.weight": weights["linear_1.weight"]}, source)
    overrides = [*SHORT, "tracking=none", f"model.projector={source}", f"output_dir={tmp_path}/r"]
    with pytest.raises(LmmtuneError) as raised:
        finetune(compose_config(overrides))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        f"refused before training: model.projector={source}: keys {{model.mm_projector.0.weight}}"
    )
    assert not (tmp_path / "r").exists()


def refused_on_the_command_line(workdir: Path) -> None:
    """A projector of other shapes: exit 1, one error line, no traceback, no run folder."""
    shapes = {name: torch.zeros(3, 3) for name in LLAVA_KEYS}
    torch.save(shapes, workdir / "other.bin")
    result = run_cli([*SHORT, "tracking=none", "model.projector=other.bin"], cwd=workdir)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "refused before training: model.projector=other.bin: " in lines[0]
    assert "the model's projector takes [64, 64]" in lines[0]
    assert not any(p.is_dir() for p in workdir.iterdir())  # no run folder: nothing written


def projector_of(tensors: dict) -> dict:
    """The projector's tensors by the module's own names (`linear_1.weight`, ...)."""
    marker = "multi_modal_projector."
    return {k.split(marker)[1]: v for k, v in tensors.items() if marker in k}


def before_answers(run_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").open()]
    return [row["before"] for row in rows]


@pytest.mark.slow
@pytest.mark.heavy  # not in CI: five CLI processes
def test_stage2_from_an_aligned_projector_evaluates_trains_and_exports_with_it(tmp_path):
    refused_on_the_command_line(tmp_path)
    source, weights = write_llava_projector(tmp_path)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    aligned = [*SHORT, "model.projector=mm_projector.bin", "peft.train_projector=false"]
    result = run_cli([*aligned, "output_dir=aligned"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    plain = run_cli([*SHORT, "tracking=none", "output_dir=plain"], cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-4000:]
    run = tmp_path / "aligned"

    # eval "before" is the base with the aligned projector: other answers than the base's own
    assert before_answers(run) != before_answers(tmp_path / "plain")
    # the source is recorded: the run's config, its MLflow params and tags
    saved = (run / "config.yaml").read_text()
    assert "projector: mm_projector.bin" in saved and f"projector_sha256: {sha}" in saved
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert tracked.data.params["model.projector"] == "mm_projector.bin"
    assert tracked.data.tags["projector_sha256"] == sha
    assert tracked.data.tags["projector_source"] == str(source.resolve())
    # the adapter carries it (peft's modules_to_save, and the copy for the base)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    carried = projector_of(adapter)
    assert carried.keys() == weights.keys()
    assert all(torch.equal(carried[k], weights[k]) for k in weights)  # frozen: not trained
    assert (run / "adapter" / ALIGNED_COPY).is_file()

    # `eval` (load_finished_run) measures the same base: the same answers "before"
    evaluated = run_cli(["eval", "output_dir=aligned", "eval.after=false"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").open()]
    assert [row["before"] for row in rows] == before_answers(run)

    # the merged export carries the aligned projector, equal to the source
    exported = run_cli(["export", "output_dir=aligned", "export.log_model=false"], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-4000:]
    merged = load_file(str(run / "export-merged" / "model.safetensors"))
    projector = {
        k.split("multi_modal_projector.")[1]: v
        for k, v in merged.items()
        if "multi_modal_projector." in k
    }
    assert projector.keys() == weights.keys()
    assert all(torch.equal(projector[k], weights[k]) for k in weights)
