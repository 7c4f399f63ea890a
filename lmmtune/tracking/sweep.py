"""Hydra multirun sweeps in MLflow: one parent run per sweep, each job a child run under it.

`python -m lmmtune -m recipe=demo peft.r=16,64` runs one job per value. `SweepCallback`
(registered in conf/config.yaml under hydra.callbacks) opens the parent run when the
sweep starts and writes its id to `SWEEP_DIR/mlflow_sweep.json`; each job's tracker
reads it (`sweep_job`) and starts its run as a child named after its swept values
(`peft.r=16`), so the UI shows the sweep as one row that unfolds into its jobs, all
with the same metric names. The parent ends FINISHED with the sweep, FAILED if the
sweep stops early."""

from __future__ import annotations

import atexit
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lmmtune.redact import redact, redact_value
from lmmtune.tracking.parent import ParentRun, open_parent_run

log = logging.getLogger(__name__)

MARKER = "mlflow_sweep.json"


@dataclass
class SweepJob:
    parent_run_id: str
    run_name: str
    """The job's swept values, e.g. `peft.r=16`."""


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a multirun sweeps over: `peft.r=16,64` -> `peft.r`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def sweep_job() -> SweepJob | None:
    """This job's parent run and name inside a Hydra multirun; None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    marker = Path(hydra_cfg.sweep.dir) / MARKER
    if not marker.is_file():
        return None
    sweep = json.loads(marker.read_text())
    keys = set(sweep["swept"])
    values = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in keys]
    name = " ".join(values) or f"job {hydra_cfg.job.num}"
    return SweepJob(parent_run_id=sweep["run_id"], run_name=name)


class SweepCallback(Callback):
    """Open the sweep's parent MLflow run before the first job and close it after the last."""

    def __init__(self) -> None:
        self.parent: ParentRun | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from lmmtune import distributed

        if config.tracking.backend != "mlflow" or not distributed.is_main():
            return
        try:
            self._open_parent(config)
        except Exception as exc:  # tracking must never stop a sweep; jobs then run unnested
            log.warning("could not open the sweep's parent MLflow run: %s", redact_value(str(exc)))

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        mask_multirun_file(config)  # Hydra writes it after on_multirun_start

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        mask_multirun_file(config)
        self._close("FINISHED")

    def _open_parent(self, config: DictConfig) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = [redact_value(o) for o in config.hydra.overrides.task]
        keys = swept_keys(overrides)
        self.parent = open_parent_run(
            config.tracking,
            config.name,
            run_name=f"sweep {' '.join(o for o in overrides if o.split('=')[0] in keys)}",
            tags={
                "recipe": config.name,
                "lmmtune.sweep_dir": str(sweep_dir.resolve()),
                "mlflow.note.content": sweep_description(config.name, overrides, keys),
            },
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        marker = {"run_id": self.parent.run_id, "swept": keys}
        (sweep_dir / MARKER).write_text(json.dumps(marker))
        atexit.register(self._close, "FAILED")  # a job that fails ends the process
        log.info("sweep over %s: parent MLflow run %s", ", ".join(keys), self.parent.run_id)

    def _close(self, status: str) -> None:
        if self.parent is not None:
            self.parent.end(status)
        self.parent = None


def mask_multirun_file(config: DictConfig) -> None:
    """Hydra's SWEEP_DIR/multirun.yaml (the sweep's config and overrides), secrets masked."""
    from omegaconf import OmegaConf

    from lmmtune.rundir.files import write_text_atomic

    try:
        path = Path(config.hydra.sweep.dir) / "multirun.yaml"
    except Exception:  # noqa: BLE001 - not a multirun: nothing to mask
        return
    if not path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    masked = redact(saved)
    if masked != saved:
        write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(masked)))


def sweep_description(name: str, overrides: list[str], keys: list[str]) -> str:
    """The parent run's description (markdown): what was swept, how to compare the jobs."""
    swept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    fixed = [o for o in overrides if o not in swept]
    lines = [
        f"**Hydra multirun sweep** of recipe `{name}` over " + ", ".join(f"`{o}`" for o in swept),
        "",
        "Each job is a child run below (expand this row); select the children and *Compare* "
        "to see their loss curves and eval metrics side by side.",
    ]
    if fixed:
        lines += ["", "Fixed overrides: " + " ".join(f"`{o}`" for o in fixed)]
    return "\n".join(lines)
