"""`merge`: adapters of one base combined with peft's add_weighted_adapter, the fully trained
modules by merge.projector; refusals in one line each, before any model loads.

The adapters are real peft LoRA adapters on the tiny 4-bit base (random LoRA B and
projector, so that every combination has something to combine), saved as training saves
them, inside run folders with the demo's settings."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from peft.utils.merge_utils import ties
from safetensors.torch import load_file

from lmmtune.errors import LmmtuneError
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli

RANK, ALPHA = 4, 8


def make_run(folder, seed: int, rank: int = RANK):
    """A run folder (config.yaml, demo_data, adapter/) whose adapter has random LoRA B and
    a perturbed projector, as a trained one would."""
    from lmmtune.demo import write_demo_dataset
    from lmmtune.model import apply_lora, load_model, resolve_model_path

    overrides = ["recipe=demo", f"peft.r={rank}", f"peft.alpha={ALPHA}", "peft.train_lm_head=false"]
    cfg = compose_config(overrides)
    folder.mkdir(parents=True)
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    write_demo_dataset(folder / "demo_data", 4, 0)
    model = apply_lora(load_model(cfg.model, cfg.quant), cfg.peft, False)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name or ("multi_modal_projector" in name and parameter.requires_grad):
            parameter.data += torch.randn(parameter.shape, generator=generator) * 0.1
    model.save_pretrained(folder / "adapter")
    base = {"base_model": resolve_model_path(cfg.model)}
    (folder / "adapter" / "lmmtune_base.json").write_text(json.dumps(base))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return make_run(root / "run_a", seed=1), make_run(root / "run_b", seed=2)


def merge(runs, out, *overrides, tracking="tracking.backend=none"):
    from lmmtune.api import merge_adapters

    adapters = f"adapters=[{runs[0]},{runs[1]}]"
    cfg = compose_config([adapters, f"output_dir={out}", tracking, *overrides])
    record = merge_adapters(cfg)
    return record, load_file(out / "adapter" / "adapter_model.safetensors")


def weights_of(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def lora_pairs(state):
    """{layer: (A, B)} of an adapter's saved tensors."""
    return {
        key.replace(".lora_A.weight", ""): (value, state[key.replace("lora_A", "lora_B")])
        for key, value in state.items()
        if key.endswith("lora_A.weight")
    }


def test_linear_and_ties_combine_each_matrix_and_average_the_projector(runs, tmp_path):
    """linear: the weighted sum of each LoRA matrix (peft folds each scaling alpha/r into
    them, the result's is 1); ties: peft's ties of the matrices; the projector: the average."""
    _, linear = merge(runs, tmp_path / "linear", "weights=[0.7,0.3]")
    _, tied = merge(runs, tmp_path / "ties", "merge.combination=ties", "merge.density=0.5")
    scale = ALPHA / RANK
    first, second = lora_pairs(weights_of(runs[0])), lora_pairs(weights_of(runs[1]))
    assert lora_pairs(linear).keys() == first.keys() == lora_pairs(tied).keys()
    w1, w2, half = math.sqrt(0.7 * scale), math.sqrt(0.3 * scale), math.sqrt(0.5 * scale)
    for layer, (a, b) in lora_pairs(linear).items():
        (a1, b1), (a2, b2) = first[layer], second[layer]
        torch.testing.assert_close(a, w1 * a1 + w2 * a2)
        torch.testing.assert_close(b, w1 * b1 + w2 * b2)
        a_ties, b_ties = lora_pairs(tied)[layer]
        torch.testing.assert_close(a_ties, ties([a1, a2], torch.tensor([half, half]), 0.5))
        torch.testing.assert_close(b_ties, ties([b1, b2], torch.tensor([half, half]), 0.5))
    config = json.loads((tmp_path / "linear" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK
    full = [key for key in linear if "lora_" not in key]
    assert full and all("multi_modal_projector" in key for key in full)
    a_state, b_state = weights_of(runs[0]), weights_of(runs[1])
    for key in full:
        assert not torch.equal(a_state[key], b_state[key])
        torch.testing.assert_close(linear[key], 0.7 * a_state[key] + 0.3 * b_state[key])
        torch.testing.assert_close(tied[key], (a_state[key] + b_state[key]) / 2)


@pytest.mark.slow
@pytest.mark.heavy  # not in CI: trains two runs, several merges
def test_merge_output_loads_with_peft_is_tracked_and_taken_by_predict(runs, tmp_path):
    """cat under plain peft: exactly the weighted sum of the updates; dare_ties: the same
    again with the same seed; MLflow keeps the inputs; predict takes the output as a run;
    overwrite rules."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cat = ["merge.combination=cat", "weights=[0.6,0.4]", f"tracking.tracking_uri={uri}"]
    record, _ = merge(runs, tmp_path / "cat", *cat, tracking="tracking.backend=mlflow")
    assert record["rank"] == 2 * RANK
    merged, first, second = (peft_deltas(r / "adapter") for r in (tmp_path / "cat", *runs))
    assert merged and merged.keys() == first.keys()
    for name, delta in merged.items():
        torch.testing.assert_close(delta, 0.6 * first[name] + 0.4 * second[name])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.data.params["merge.combination"] == "cat"
    assert run.data.params["weights"] == "[0.6, 0.4]" and run.data.tags["command"] == "merge"
    assert run.data.tags["adapter.1"] == str((runs[1] / "adapter").resolve())

    dare = ["merge.combination=dare_ties", f"merge.projector={runs[1]}"]
    _, once = merge(runs, tmp_path / "once", *dare)
    _, again = merge(runs, tmp_path / "again", *dare)
    assert once.keys() == again.keys() and all(torch.equal(once[k], again[k]) for k in once)
    zeros = [(a == 0).float().mean().item() for a, _ in lora_pairs(once).values()]
    assert 0.1 < sum(zeros) / len(zeros) < 0.7  # dropped at random, half of each kept
    assert all(torch.equal(once[k], weights_of(runs[1])[k]) for k in once if "lora_" not in k)

    out = tmp_path / "once"
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.path == "tiny" and saved.peft.r == RANK
    assert saved.data.train == str(runs[0] / "demo_data" / "train.json")  # A's eval split
    question = "predict.question=Is the scan normal?"
    result = run_cli(["predict", f"output_dir={out}", question], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with pytest.raises(LmmtuneError, match="already holds a merge; pass overwrite=true"):
        merge(runs, out)
    (out / "mine.txt").write_text("keep")
    with pytest.raises(LmmtuneError, match="files the merge did not write"):
        merge(runs, out, "overwrite=true")
    assert (out / "mine.txt").read_text() == "keep"


def peft_deltas(adapter) -> dict:
    """Each LoRA layer's update as plain peft computes it, the adapter loaded on its base."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base_dir = json.loads((adapter / "lmmtune_base.json").read_text())["base_model"]
    model = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(base_dir), str(adapter)
    )
    return {
        name: module.get_delta_weight("default")
        for name, module in model.named_modules()
        if "default" in getattr(module, "lora_A", {})
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapters=[a]"], "name at least two adapters"),
        (["adapters=[a,b]", "weights=[1.0]"], "weights has 1 weight(s) for 2 adapter(s)"),
        (["adapters=[a,b]", "weights=[1.0,-1.0]"], "sum to 0"),
        (["adapters=[a,b]", "merge.projector=c"], "merge.projector=c: not one of"),
        (["adapters=[a,b]", "merge.density=0"], "merge.density=0.0: must be within (0, 1]"),
    ],
)
def test_settings_that_cannot_merge_are_refused_at_composition(overrides, message):
    with pytest.raises(LmmtuneError) as refused:
        validate(compose_config(overrides), "merge")
    assert message in str(refused.value)


def test_incompatible_adapters_are_refused_one_line_each_before_loading(runs, tmp_path, caplog):
    from lmmtune.api import merge_adapters

    other_base = shutil.copytree(runs[1], tmp_path / "other_base")
    (other_base / "adapter" / "lmmtune_base.json").write_text('{"base_model": "/models/other"}')
    other_rank = shutil.copytree(runs[1], tmp_path / "other_rank")
    config_file = other_rank / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 8, "target_modules": ".*q_proj"}))
    adapters = f"adapters=[{runs[0]},{other_base},{other_rank}]"
    out = tmp_path / "out"
    cfg = compose_config([adapters, "merge.combination=ties", f"output_dir={out}"])
    caplog.set_level("INFO", logger="lmmtune.model")
    with pytest.raises(LmmtuneError) as refused:
        merge_adapters(cfg)
    lines = str(refused.value).split("cannot merge these adapters:")[1].strip().splitlines()
    assert len(lines) == 3, refused.value
    assert f"{runs[0]} was trained on" in lines[0] and "/models/other" in lines[0]
    assert "different target modules" in lines[1] and "needs adapters of one rank" in lines[2]
    loads = [r for r in caplog.records if r.name == "lmmtune.model"]
    assert not loads and not out.exists()  # no model loaded, nothing written


@pytest.mark.slow
@pytest.mark.heavy  # not in CI: two demo trainings and six evaluations
def test_two_demo_domains_trained_merged_with_ties_and_evaluated_on_both(tmp_path):
    """The bench's table, briefly trained: each adapter learns its own domain and not the
    other's (the domains differ); the ties merge of the two is evaluated on both
    (docs/peft_methods.md has the full-length numbers)."""
    from benchmarks.merge_domains import DOMAINS, domain_table, train

    quick = ["data.demo_size=96", "train.epochs=6"]
    runs = {task: train(tmp_path, task, quick) for task in DOMAINS}
    table = domain_table(tmp_path, runs, combinations=("ties",), weights=(1.0, 1.0))
    base = table["base (no adapter)"]
    for domain, other in zip(DOMAINS, reversed(DOMAINS), strict=True):
        assert table[f"adapter `{domain}`"][domain] >= base[domain] + 0.3, table
        assert table[f"adapter `{domain}`"][other] <= base[other] + 0.2, table
    assert set(table["merged, ties"]) == set(DOMAINS), table
    assert json.loads((tmp_path / "merged-ties" / "merge.json").read_text())["rank"] == 16
