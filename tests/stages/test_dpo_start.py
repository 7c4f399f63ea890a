"""What the preference stage starts from is checked before the run directory is touched: an SFT
adapter in safetensors that loads, or the base model when asked for by name."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.folders import LOCK
from lmmtune.stages.dpo import check_init_adapter
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli


def test_demo_dpo_without_an_adapter_says_to_run_the_sft_demo_first(tmp_path):
    result = run_cli(["recipe=demo_dpo", "output_dir=dpo", "tracking=none"], cwd=tmp_path)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "dpo.init_adapter is not set" in result.stderr
    assert "python -m lmmtune recipe=demo output_dir=outputs/demo_sft" in result.stderr
    assert not (tmp_path / "dpo").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dpo.init_adapter="], "dpo.init_adapter='': empty"),
        (["dpo.init_adapter=x", "dpo.from_base=true"], "exclude each other"),
    ],
)
def test_an_empty_or_contradicting_start_is_refused(overrides, message):
    cfg = compose_config(["recipe=demo_dpo", *overrides])
    with pytest.raises(LmmtuneError, match=message):
        validate(cfg, "train")


def test_the_base_is_a_start_only_when_asked_for():
    validate(compose_config(["recipe=demo_dpo", "dpo.from_base=true"]), "train")


def write_adapter(folder, weights: str) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    if weights == "pickle":
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    elif weights == "garbage":
        (folder / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    elif weights == "cut":
        import torch

        save_file({"w": torch.zeros(64)}, str(folder / "adapter_model.safetensors"))
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[:-16])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("pickle", "holds adapter_model.bin, pickled weights, and no safetensors"),
        ("garbage", "adapter_model.safetensors is damaged"),
        ("cut", "adapter_model.safetensors is damaged"),
        ("none", "holds no adapter_model.safetensors"),
    ],
)
def test_an_adapter_that_is_no_safetensors_adapter_is_refused_in_one_line(
    tmp_path, weights, message
):
    write_adapter(tmp_path / "adapter", weights)
    cfg = compose_config(["recipe=demo_dpo", f"dpo.init_adapter={tmp_path / 'adapter'}"])
    with pytest.raises(LmmtuneError, match=message) as refused:
        check_init_adapter(cfg.dpo, "tiny")
    assert "\n" not in str(refused.value)


def test_dpo_pointed_at_its_own_sft_run_with_overwrite_deletes_nothing(tmp_path):
    import torch

    from tests.test_rundir import make_run

    run = make_run(tmp_path / "run")  # a finished SFT run: its adapter, checkpoints, metrics
    save_file({"w": torch.zeros(4)}, str(run.adapter / "adapter_model.safetensors"))
    before = run_files(run.root)

    result = run_cli(
        [
            "recipe=demo_dpo",
            f"dpo.init_adapter={run.adapter}",
            f"output_dir={run.root}",
            "overwrite=true",
            "tracking=none",
        ],
        cwd=tmp_path,
    )

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"overwrite=true would delete dpo.init_adapter={run.adapter}" in result.stderr
    assert run_files(run.root) == before


def run_files(root) -> dict:
    """Every file of a run and its bytes (the lock holds the pid of the last process)."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != LOCK}


@pytest.mark.parametrize(
    ("damaged", "message"),
    [
        ("adapter_config.json", "adapter_config.json is damaged"),
        ("lmmtune_base.json", "is damaged"),
    ],
)
def test_a_damaged_adapter_record_is_named_not_a_traceback(tmp_path, damaged, message):
    import torch

    write_adapter(tmp_path / "adapter", "none")
    save_file({"w": torch.zeros(4)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / damaged).write_text("[not json")
    cfg = compose_config(["recipe=demo_dpo", f"dpo.init_adapter={tmp_path / 'adapter'}"])
    with pytest.raises(LmmtuneError, match=message):
        check_init_adapter(cfg.dpo, "tiny")
