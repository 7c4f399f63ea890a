"""Shared fixtures: the tiny LLaVA (built once per machine, cached), CLI runners, isolated MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def compose_config(overrides: list[str] | tuple[str, ...] = ()):
    """The config `python -m lmmtune OVERRIDES` would get: conf/ and recipes/ through Hydra."""
    from lmmtune.api import compose_config as compose

    return compose(list(overrides))


def run_bench(args: list[str], out: Path) -> dict:
    """`python -m benchmarks.bench ARGS --out OUT` in a process of its own; its JSON report."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", *args, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from lmmtune.demo import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_path)


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m lmmtune ARGS` as a user would, in `cwd`, with MLflow kept inside `cwd`."""
    full_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
        "PYTHONUNBUFFERED": "1",
    }
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lmmtune", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """One real `python -m lmmtune recipe=demo` run, shared by the tests that inspect its outputs."""
    workdir = tmp_path_factory.mktemp("demo")
    result = run_cli(["recipe=demo", "output_dir=run"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return {
        "workdir": workdir,
        "run_dir": workdir / "run",
        "result": result,
        "tracking_uri": f"sqlite:///{workdir}/mlflow.db",
    }


@contextlib.contextmanager
def local_server(
    command: list[str], cwd: Path, env: dict, log: Path, probe_url: str, name: str, timeout: float
):
    """A server a test starts (its own process group, its output in `log`), once it answers
    `probe_url`; stopped with its whole process group after, whatever happens."""
    with log.open("w") as out:
        server = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_answering(probe_url, server, log, name, timeout)
        yield server
    finally:
        stop_server(server)


def wait_until_answering(
    url: str, server: subprocess.Popen, log: Path, name: str, timeout: float
) -> None:
    """Wait until a local server started by a test answers `url` with 200, or fail with its log."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{name} exited: {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    pytest.fail(f"{name} did not answer in {timeout} s: {log.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    """End a test's server and its whole process group (SIGTERM, then SIGKILL after 20 s)."""
    import signal

    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
