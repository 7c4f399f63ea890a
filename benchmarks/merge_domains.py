"""Two demo domains, an adapter for each, combined by `merge`: held-out accuracy of the base,
of each single adapter and of each combination, on both domains.

    python -m benchmarks.merge_domains --workdir merge_bench
    python -m benchmarks.merge_domains --workdir merge_bench --run-side RUN --run-vertical RUN

Domain `side` is the demo (is there a lesion, which side); `vertical` the same kind of scans
with other questions (is the scan normal, top or bottom). Each domain's adapter is trained
with `recipe=demo` (`--train` adds overrides), unless given; each adapter is evaluated on
each domain's held-out split as `eval eval.data=...` does, all in this one process. Prints a Markdown table and writes
it as JSON to WORKDIR/merge_domains.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOMAINS = ("side", "vertical")
COMBINATIONS = ("linear", "ties", "dare_ties")


def train(workdir: Path, task: str, overrides: list[str]) -> Path:
    """A demo run of `task` in WORKDIR/task."""
    from lmmtune.api import finetune

    run = workdir / task
    finetune(config(["recipe=demo", f"data.demo_task={task}", f"output_dir={run}", *overrides]))
    return run


def merge(
    workdir: Path, runs: dict[str, Path], combination: str, density: float, weights: list[float]
) -> Path:
    from lmmtune.api import merge_adapters

    out = workdir / f"merged-{combination}"
    adapters = f"adapters=[{runs['side']},{runs['vertical']}]"
    settings = [f"merge.combination={combination}", f"merge.density={density}"]
    settings.append(f"weights=[{','.join(map(str, weights))}]")
    merge_adapters(config([adapters, *settings, f"output_dir={out}", "overwrite=true"]))
    return out


def accuracy(workdir: Path, run: Path, data: Path, name: str) -> float:
    """Held-out accuracy of `run`'s adapter on `data`."""
    from lmmtune.eval.run import run_eval
    from lmmtune.validate import validate

    out = workdir / "evals" / name
    overrides = [f"output_dir={run}", f"eval.data={data}", f"eval.output={out}"]
    overrides += ["eval.before=false", "eval.overwrite=true"]
    cfg = config(overrides)
    validate(cfg, "eval")
    metrics = run_eval(cfg, overrides)  # the run's settings, these overrides over them
    return metrics["eval_after"]["accuracy"]


def config(overrides: list[str]):
    """The composed config of `python -m lmmtune OVERRIDES`, tracking off (run in this
    process: the libraries are imported once for all the runs and evaluations)."""
    from lmmtune.api import compose_config

    return compose_config([*overrides, "tracking.backend=none"])


def domain_table(
    workdir: Path,
    runs: dict[str, Path],
    combinations=COMBINATIONS,
    density: float = 0.5,
    weights: tuple[float, float] = (0.5, 0.5),
) -> dict[str, dict[str, float]]:
    """{row: {domain: accuracy}}: the base, each single adapter, each combination. A run's
    own domain takes the accuracies its training measured on that same held-out split."""
    models = {f"adapter `{task}`": runs[task] for task in DOMAINS}
    for combination in combinations:
        models[f"merged, {combination}"] = merge(workdir, runs, combination, density, list(weights))
    table: dict[str, dict[str, float]] = {"base (no adapter)": {}, **{row: {} for row in models}}
    for domain in DOMAINS:
        data = runs[domain] / "demo_data" / "eval.json"
        trained = json.loads((runs[domain] / "metrics.json").read_text())
        table["base (no adapter)"][domain] = trained["eval_before"]["accuracy"]
        table[f"adapter `{domain}`"][domain] = trained["eval_after"]["accuracy"]
        for row, run in models.items():
            if domain not in table[row]:
                name = f"{domain}-{row.split()[-1].strip('`')}"
                table[row][domain] = accuracy(workdir, run, data, name)
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS)]
    for row, scores in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{scores[d]:.3f}" for d in DOMAINS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run-side", type=Path, help="a finished demo run (data.demo_task=side)")
    parser.add_argument(
        "--run-vertical", type=Path, help="a finished run of data.demo_task=vertical"
    )
    parser.add_argument("--train", nargs="*", default=[], help="overrides for the two demo runs")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--weights", type=float, nargs=2, default=[0.5, 0.5])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    given = {"side": args.run_side, "vertical": args.run_vertical}
    runs = {
        task: (path.resolve() if path else train(args.workdir.resolve(), task, args.train))
        for task, path in given.items()
    }
    table = domain_table(
        args.workdir.resolve(), runs, density=args.density, weights=tuple(args.weights)
    )
    (args.workdir / "merge_domains.json").write_text(json.dumps(table, indent=2))
    print(markdown(table))


if __name__ == "__main__":
    main()
