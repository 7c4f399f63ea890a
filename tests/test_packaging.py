"""The wheel carries the configs: installed into a fresh venv, it runs the demo from an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_package_finds_its_configs_in_a_checkout():
    from lmmtune.config import CONF_DIR, RECIPES_DIR, available_recipes

    assert (CONF_DIR / "config.yaml").is_file() and (RECIPES_DIR / "demo.yaml").is_file()
    assert {"demo", "medical"} <= set(available_recipes())


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         tmp_path / "dist", REPO_ROOT])  # fmt: skip
    wheel = next((tmp_path / "dist").glob("lmmtune-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"lmmtune/{p.relative_to(REPO_ROOT)}" for p in REPO_ROOT.glob("*/**/*.yaml")}
    configs = {c for c in configs if c.startswith(("lmmtune/conf/", "lmmtune/recipes/"))}
    assert configs and configs <= shipped

    # The venv sees the installed dependencies (torch, transformers, ...) but gets its own lmmtune.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", wheel])
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{empty}/mlflow.db"
    where = run([python, "-c", "import lmmtune.config as c; print(c.__file__, c.CONF_DIR)"],
                cwd=empty, env=env)  # fmt: skip
    module, conf = where.stdout.split()
    assert module.startswith(str(venv)) and conf.startswith(str(venv)), where.stdout

    demo = ["recipe=demo", "output_dir=run", "data.demo_size=32", "train.max_steps=4"]
    run([python, "-m", "lmmtune", *demo, "eval.max_new_tokens=2"], cwd=empty, env=env)
    assert (empty / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (empty / "run" / "metrics.json").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["mlflow.db", "mlruns", "run"]
