"""model.projector: an aligned projector (LLaVA's mm_projector.bin, a safetensors file, a
stage-1 run folder) loads into the base with outputs equal to its source weights, travels with
the adapter, and anything else is refused in one line naming the file and the reason."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file

from lmmtune.config import ModelConfig, PeftConfig, QuantConfig
from lmmtune.errors import LmmtuneError
from lmmtune.model import apply_lora, load_model, read_aligned_projector
from lmmtune.model_projector import ALIGNED_COPY, LLAVA_KEYS, PROJECTOR, adapter_copy
from lmmtune.rundir.run import PROJECTOR_FILE, RunDir, open_run_dir

QLORA = QuantConfig(mode="4bit", compute_dtype="float32")
HF_KEYS = {name: f"{PROJECTOR}.{name}" for name in LLAVA_KEYS.values()}


def tiny(projector: Path | str | None = None, **settings) -> ModelConfig:
    return ModelConfig(
        path="tiny", dtype="float32", projector=None if projector is None else str(projector),
        **settings,
    )  # fmt: skip


@pytest.fixture(scope="module")
def source(tiny_model_path) -> dict[str, torch.Tensor]:
    """Projector weights of the tiny model's shapes, far from its own (std 1), by module name."""
    from transformers import AutoConfig

    from lmmtune.model_projector import expected_shapes

    shapes = expected_shapes(AutoConfig.from_pretrained(tiny_model_path))
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def llava_bin(folder: Path, weights: dict, name: str = "mm_projector.bin") -> Path:
    """LLaVA's own stage-1 file: torch.save of a dict of its 4 tensors under its key names."""
    path = folder / name
    names = {module: llava for llava, module in LLAVA_KEYS.items()}
    torch.save({names[key]: tensor for key, tensor in weights.items()}, path)
    return path


def hf_safetensors(folder: Path, weights: dict, name: str = PROJECTOR_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({HF_KEYS[key]: tensor for key, tensor in weights.items()}, str(folder / name))
    return folder / name


def stage1_run(folder: Path, weights: dict) -> Path:
    """A run folder as lmmtune makes it (its manifest), holding RUN/projector/projector.safetensors."""
    open_run_dir(folder)
    hf_safetensors(RunDir(folder).projector_dir, weights)
    return folder


def projector_output(weights: dict, features: torch.Tensor) -> torch.Tensor:
    """LLaVA's projector computed from the source weights: linear_2(gelu(linear_1(x)))."""
    hidden = F.gelu(F.linear(features, weights["linear_1.weight"], weights["linear_1.bias"]))
    return F.linear(hidden, weights["linear_2.weight"], weights["linear_2.bias"])


def base_projector(model) -> torch.nn.Module:
    """The projector as the model computes it (under peft: its ModulesToSaveWrapper)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_submodule("model.multi_modal_projector")


@pytest.mark.parametrize("layout", ["mm_projector.bin", "safetensors", "run folder"])
def test_an_aligned_projector_loads_with_outputs_equal_to_its_source(tmp_path, source, layout):
    given = {
        "mm_projector.bin": lambda: llava_bin(tmp_path, source),
        "safetensors": lambda: hf_safetensors(tmp_path, source, "aligned.safetensors"),
        "run folder": lambda: stage1_run(tmp_path / "stage1", source),
    }[layout]()
    aligned = read_aligned_projector(tiny(given))
    model = load_model(tiny(given), QLORA, aligned)
    features = torch.randn(5, source["linear_1.weight"].shape[1])
    with torch.no_grad():
        got = base_projector(model)(features)
    assert torch.equal(got, projector_output(source, features))
    assert aligned.sha256 == hashlib.sha256(aligned.source.read_bytes()).hexdigest()


def test_the_adapter_carries_the_frozen_aligned_projector_and_loads_with_plain_peft(
    tmp_path, source
):
    given = llava_bin(tmp_path, source)
    aligned = read_aligned_projector(tiny(given))
    config = PeftConfig(r=4, alpha=8, train_projector=False)
    model = apply_lora(load_model(tiny(given), QLORA, aligned), config, False, True)
    projector = {n: p for n, p in model.named_parameters() if PROJECTOR in n}
    assert projector and not any(p.requires_grad for p in projector.values())  # frozen
    model.save_pretrained(tmp_path / "adapter")
    aligned.save_copy(tmp_path / "adapter")

    # plain peft on a fresh base (its own projector): the adapter brings the aligned one
    fresh = load_model(tiny(), QLORA)
    assert not torch.equal(base_projector(fresh).linear_1.weight, source["linear_1.weight"])
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    features = torch.randn(4, source["linear_1.weight"].shape[1])
    with torch.no_grad():
        assert torch.equal(base_projector(loaded)(features), projector_output(source, features))
    copy = adapter_copy(tmp_path / "adapter")  # what the base "before" is measured with
    assert all(torch.equal(copy.weights[k], source[k]) for k in source)
    assert load_file(str(tmp_path / "adapter" / ALIGNED_COPY)).keys() == set(HF_KEYS.values())


class RunsCode:
    """A pickled object whose unpickling would create a file: what weights_only must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def refusal(tmp_path: Path, source: dict, case: str) -> tuple[Path, str]:
    """(model.projector, a phrase its refusal must hold) for each way a projector is wrong."""
    wrong_keys = {"linear_1.weight": source["linear_1.weight"], "x": source["linear_1.bias"]}
    wrong_shapes = {k: torch.zeros(*v.shape[:-1], 3) for k, v in source.items()}
    if case == "wrong keys":
        save_file(wrong_keys, str(tmp_path / "p.safetensors"))
        return tmp_path / "p.safetensors", "are not a LLaVA projector's"
    if case == "wrong shapes":
        return llava_bin(tmp_path, wrong_shapes), "the model's projector takes [64, 64]"
    if case == "a pickle that is no plain tensors":
        path = tmp_path / "mm_projector.bin"
        with path.open("wb") as handle:
            pickle.dump({"model.mm_projector.0.weight": RunsCode(tmp_path / "pwned")}, handle, 2)
        return path, "not a plain file of tensors, refused"
    if case == "another pickle":
        torch.save({}, tmp_path / "projector.pt")
        return tmp_path / "projector.pt", ".pt is refused"
    if case == "integer weights":
        ints = {k: v.to(torch.int32) for k, v in source.items()}
        return llava_bin(tmp_path, ints), "not a float tensor"
    if case == "a missing file":
        return tmp_path / "nowhere" / "mm_projector.bin", "no such file or folder"
    if case == "a folder that is no run":
        hf_safetensors(tmp_path / "plain" / "projector", source)
        return tmp_path / "plain", "no lmmtune run"
    if case == "a run without a projector":
        open_run_dir(tmp_path / "run")
        return tmp_path / "run", "the run holds no projector"
    outside = hf_safetensors(tmp_path / "elsewhere", source)
    run = tmp_path / "run"
    open_run_dir(run)
    if case == "a projector folder linking out of the run":
        os.symlink(outside.parent, RunDir(run).projector_dir)
    else:  # the projector file links out
        RunDir(run).projector_dir.mkdir()
        os.symlink(outside, RunDir(run).projector_dir / PROJECTOR_FILE)
    return run, "is a link; the projector must lie inside the run"


REFUSALS = [
    "wrong keys",
    "wrong shapes",
    "a pickle that is no plain tensors",
    "another pickle",
    "integer weights",
    "a missing file",
    "a folder that is no run",
    "a run without a projector",
    "a projector folder linking out of the run",
    "a projector file linking out of the run",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_a_wrong_projector_is_refused_in_one_line_naming_it(tmp_path, source, case):
    given, reason = refusal(tmp_path, source, case)
    with pytest.raises(LmmtuneError) as raised:
        read_aligned_projector(tiny(given))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"model.projector={given}: ")
    assert reason in message, message
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


def test_a_pinned_sha256_refuses_another_file(tmp_path, source):
    given = llava_bin(tmp_path, source)
    with pytest.raises(LmmtuneError, match="its sha256 is [0-9a-f]{64}, not model.projector_sha"):
        read_aligned_projector(tiny(given, projector_sha256="0" * 64))


def test_dpo_from_a_stage2_adapter_starts_its_base_from_the_adapters_aligned_projector(
    tmp_path, source
):
    """The reference with the adapter off is the aligned base too; a link there is refused."""
    from lmmtune.model_projector import AlignedProjector
    from lmmtune.stages.dpo import DPORecipe
    from tests.conftest import compose_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    AlignedProjector(source, tmp_path / "mm_projector.bin", "0" * 64).save_copy(adapter)
    recipe = DPORecipe(compose_config(["recipe=demo_dpo", f"dpo.init_adapter={adapter}"]))
    started = recipe.aligned_projector()
    assert all(torch.equal(started.weights[k], source[k]) for k in source)

    (adapter / ALIGNED_COPY).rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", adapter / ALIGNED_COPY)
    with pytest.raises(LmmtuneError, match="is a link; an adapter's projector must lie in its"):
        recipe.aligned_projector()


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["model.projector_sha256=" + "a" * 64], "model.projector_sha256 needs model.projector"),
        (["model.projector=p.bin", "model.projector_sha256=abc"], "64 lowercase hex digits"),
        (["model.projector=' '"], "model.projector='': empty"),
    ],
)
def test_projector_settings_that_cannot_work_are_refused_at_composition(overrides, problem):
    from lmmtune.validate import validate
    from tests.conftest import compose_config

    with pytest.raises(LmmtuneError, match=problem):
        validate(compose_config(["recipe=demo", *overrides]))


def test_a_resume_with_another_projector_file_is_refused(tmp_path, source):
    """The run's config keeps the sha256 it read; a resume reads the file again."""
    from lmmtune.rundir.resume import check_resume
    from lmmtune.rundir.run import save_config
    from lmmtune.stages.checks import check_aligned_projector
    from tests.conftest import compose_config

    given = llava_bin(tmp_path, source)
    overrides = ["recipe=demo", f"model.projector={given}", f"output_dir={tmp_path}/run"]
    started = compose_config(overrides)
    check_aligned_projector(started)
    save_config(started, tmp_path / "run")

    llava_bin(tmp_path, {k: v + 1 for k, v in source.items()})  # the file changed since
    resumed = compose_config(overrides)
    check_aligned_projector(resumed)
    with pytest.raises(LmmtuneError, match="model.projector_sha256: '[0-9a-f]{64}' -> '"):
        check_resume(resumed, RunDir(tmp_path / "run").config, tmp_path / "none.json")
