"""The MLflow experience as a person sees it: what a finished run shows, sweeps as parent and
children, and (marked `browser`) the real MLflow UI in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import local_server, run_cli

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS_ENV = "LMMTUNE_SCREENSHOTS"
"""A folder to copy the run page's screenshot to, for a person to look at (unset: none)."""


def demo_mlflow_run(demo_run):
    client = MlflowClient(tracking_uri=demo_run["tracking_uri"])
    experiment = client.get_experiment_by_name("demo")
    # the training run (eval and export runs of other tests share the experiment)
    run_id = json.loads((demo_run["run_dir"] / "tracking.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment.experiment_id
    return client, experiment, run


def test_demo_run_says_what_was_trained_on_what(demo_run):
    client, experiment, run = demo_mlflow_run(demo_run)
    note = run.data.tags["mlflow.note.content"]
    for expected in ("**demo**", "`tiny`", "4-bit nf4", "synthetic demo set", "r=16, alpha=32"):
        assert expected in note
    assert "samples; eval" in note and "LoRA" in note and "projector" in note
    assert "- **Eval**" in note and "accuracy" in note and "→" in note  # before -> after
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_demo_run_shows_sample_images_with_answers(demo_run):
    client, _, run = demo_mlflow_run(demo_run)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "eval/eval_samples.png" in logged
    with Image.open(demo_run["run_dir"] / "eval_samples.png") as sheet:
        assert sheet.width >= 400 and sheet.height >= 290  # a grid of annotated tiles


def test_demo_run_charts_curves_and_keeps_per_run_numbers_as_tags(demo_run):
    _, _, run = demo_mlflow_run(demo_run)
    charted = set(run.data.metrics)
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= charted
    single_values = [k for k in charted if k.startswith(("eval_before/", "eval_after/"))]
    assert single_values == [] and "train/train_runtime" not in charted
    assert "train/total_flos" not in charted
    metrics = json.loads((demo_run["run_dir"] / "metrics.json").read_text())
    tags = run.data.tags
    assert float(tags["eval_after/accuracy"]) == metrics["eval_after"]["accuracy"]
    assert tags["eval_after/samples"] == "128"  # no number lost, counts too
    assert float(tags["train/train_runtime"]) == metrics["train"]["summary"]["train_runtime"]
    assert metrics["train"]["summary"]["total_flos"] > 0


def test_demo_run_lists_its_data_as_dataset_inputs(demo_run):
    _, _, run = demo_mlflow_run(demo_run)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["eval", "train"]
    train = inputs["train"]
    assert json.loads(train.dataset.source)["uri"] == str(
        (demo_run["run_dir"] / "demo_data" / "train.json").resolve()
    )
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert {t.key: t.value for t in train.tags}["samples"] == "401"
    assert len(train.dataset.digest) == 16 and train.dataset.digest != inputs["eval"].dataset.digest


def test_demo_run_has_system_metrics(demo_run):
    _, _, run = demo_mlflow_run(demo_run)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_demo_adapter_is_a_logged_model_that_answers(demo_run):
    import mlflow
    import pandas as pd

    client, experiment, run = demo_mlflow_run(demo_run)
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    (model,) = [m for m in models if m.source_run_id == run.info.run_id]  # exports log theirs
    assert model.name == "adapter_model"
    mlmodel = yaml.safe_load(
        (Path(model.artifact_location.removeprefix("file://")) / "MLmodel").read_text()
    )
    code_path = mlmodel["flavors"]["python_function"]["model_code_path"]
    assert "lmmtune-model-code-" in code_path  # a temporary copy, not the user's install path
    mlflow.set_tracking_uri(demo_run["tracking_uri"])
    answerer = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    data_dir = demo_run["run_dir"] / "demo_data"
    records = json.loads((data_dir / "eval.json").read_text())[:4]
    questions = pd.DataFrame(
        {
            "question": [r["conversations"][0]["value"].split("\n", 1)[1] for r in records],
            "image": [str(data_dir / r["image"]) for r in records],
        }
    )
    answers = answerer.predict(questions, params={"max_new_tokens": 8})
    assert answers == [r["conversations"][1]["value"] for r in records]


def test_sweep_description_names_the_swept_values():
    from lmmtune.tracking.sweep import sweep_description, swept_keys

    overrides = ["recipe=demo", "peft.r=16,64", "train.epochs=1"]
    assert swept_keys(overrides) == ["peft.r"]
    note = sweep_description("demo", overrides, ["peft.r"])
    assert "`peft.r=16,64`" in note and "`recipe=demo`" in note


@pytest.mark.slow
def test_multirun_sweep_is_one_parent_run_with_a_child_per_job(tmp_path):
    args = ["-m", "recipe=demo", "peft.r=4,8", "output_dir=sweep", "data.demo_size=16"]
    args += ["train.max_steps=2", "eval.before=false", "eval.after=false"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for job, rank in (("0", "4"), ("1", "8")):  # each job its own run directory
        assert f"r: {rank}" in (tmp_path / "sweep" / job / "config.yaml").read_text()
        assert (tmp_path / "sweep" / job / "adapter" / "adapter_config.json").exists()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert parent.info.run_name == "sweep peft.r=4,8" and parent.info.status == "FINISHED"
    assert sorted(children) == ["peft.r=4", "peft.r=8"]
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert "train/loss" in child.data.metrics  # the same metric names: they compare
    assert children["peft.r=8"].data.params["peft.r"] == "8"


# --- the MLflow UI in a real browser ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, cwd: Path, log: Path):
    """`mlflow ui` on 127.0.0.1 for the test's duration; its whole process group is killed after."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    command += ["--host", "127.0.0.1"]
    health = f"http://127.0.0.1:{port}/health"
    with local_server([*command, "--port", str(port)], cwd, env, log, health, "mlflow ui", 240):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def chromium(tmp_path):
    """Headless Debian Chromium through chromedriver, with a fresh profile and no network chatter."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y ...)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1600,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, texts: list[str], timeout: float = 120) -> str:
    """The page's text once every one of `texts` shows (the UI is a React app that loads in steps)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(drv):
        body = drv.find_element(By.TAG_NAME, "body").text
        return body if all(text in body for text in texts) else False

    return WebDriverWait(driver, timeout, poll_frequency=1).until(
        shown, message=f"not all of {texts} shown"
    )


def click_all(driver, xpath: str) -> None:
    """Click what matches, if anything (the assistant panel's close button, "Show more")."""
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.XPATH, xpath):
        with contextlib.suppress(Exception):  # gone or covered meanwhile: the view still works
            element.click()


@pytest.mark.browser
def test_mlflow_ui_shows_the_run_its_metrics_and_predictions(demo_run, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, experiment, run = demo_mlflow_run(demo_run)
    run_page = f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    view = "?workflowType=machine_learning"  # the UI's "Model training" view, not GenAI
    with mlflow_ui(demo_run["tracking_uri"], demo_run["workdir"], tmp_path / "ui.log") as url:
        chromium.get(f"{url}/{run_page}{view}")
        search = WebDriverWait(chromium, 120, poll_frequency=1).until(
            lambda driver: driver.find_elements(
                By.CSS_SELECTOR, "input[placeholder='Search metrics']"
            )
        )[0]
        click_all(chromium, "//button[@aria-label='Close']")  # the assistant panel
        click_all(chromium, "//button[normalize-space()='Show more']")  # the whole description
        search.send_keys("train/loss")  # as a person looks a metric up
        page = wait_for_text(chromium, [run.info.run_id, "Finished", "train/loss"])
        assert "QLoRA fine-tune of tiny" in page  # the run description
        digest = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
        page = wait_for_text(chromium, [f"train ({digest['train']})", "Logged models (1)"])
        assert "adapter_model" in page.split("Logged models (1)")[1]  # the run's model
        shot = tmp_path / "mlflow_run_page.png"
        chromium.save_screenshot(str(shot))
        if os.environ.get(SCREENSHOTS_ENV):
            shutil.copy(shot, Path(os.environ[SCREENSHOTS_ENV]) / shot.name)

        chromium.get(f"{url}/{run_page}/model-metrics{view}")
        charts = wait_for_text(chromium, ["train", "loss", "grad_norm", "learning_rate"])
        sections = re.findall(r"^(\S+)\n\((\d+)\)$", charts, flags=re.M)
        assert sections[0] == ("train", "4")  # the loss curves open the tab
        assert "eval_after" not in charts  # no single-bar charts
        chromium.save_screenshot(str(tmp_path / "mlflow_model_metrics.png"))

        chromium.get(f"{url}/{run_page}/artifacts/eval/predictions.json{view}")
        table = wait_for_text(chromium, ["View as table", "reference", "after", "0000-presence"])
        assert "Is there a lesion in this scan?" in table
        chromium.save_screenshot(str(tmp_path / "mlflow_predictions.png"))
