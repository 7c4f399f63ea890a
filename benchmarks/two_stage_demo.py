"""Does stage 1 help stage 2 on the demo? Held-out accuracy of instruction tuning from the
base's projector against instruction tuning from a projector aligned on the demo's captions
first (`recipe=demo_two_stage`), with the same stage-2 steps, over a few seeds.

    python -m benchmarks.two_stage_demo --workdir two_stage_bench
    python -m benchmarks.two_stage_demo --workdir two_stage_bench --seeds 0 1 2 --epochs 3

Both arms run stage 2 as `recipe=demo` does, with `train.epochs=EPOCHS` (fewer than the
recipe's 8, so that accuracy is not saturated and a head start can show), and the seed as
`train.seed`. Prints a Markdown table and writes it as JSON to WORKDIR/two_stage_demo.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ARMS = {
    "stage 2 alone": "recipe=demo",
    "stage 1 then stage 2": "recipe=demo_two_stage",
}


def run_arm(workdir: Path, arm: str, seed: int, epochs: float) -> dict:
    """One training run of `arm`; its held-out accuracy after training (and before, stage 2's
    base: with the aligned projector in the two-stage arm) and stage 1's caption loss."""
    from lmmtune.api import compose_config, finetune

    out = workdir / f"{arm.replace(' ', '_')}-{seed}"
    overrides = [ARMS[arm], f"output_dir={out}", f"train.seed={seed}", f"train.epochs={epochs}"]
    finetune(compose_config([*overrides, "overwrite=true", "tracking=none"]))
    two_stage = (out / "instruct" / "metrics.json").is_file()
    metrics = json.loads(
        ((out / "instruct") if two_stage else out).joinpath("metrics.json").read_text()
    )
    row = {"arm": arm, "seed": seed, "after": metrics["eval_after"]["accuracy"]}
    row["before"] = metrics.get("eval_before", {}).get("accuracy")
    if two_stage:
        align = json.loads((out / "align" / "metrics.json").read_text())
        row["caption_loss"] = align.get("caption_loss")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| arm | seeds | accuracy after (mean ± sd) | per seed |", "|---|---|---|---|"]
    for arm in ARMS:
        values = [r["after"] for r in rows if r["arm"] == arm]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        shown = ", ".join(f"{v:.3f}" for v in values)
        lines.append(
            f"| {arm} | {len(values)} | {statistics.mean(values):.3f} ± {spread:.3f} | {shown} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.two_stage_demo")
    parser.add_argument("--workdir", type=Path, default=Path("two_stage_bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=3.0, help="stage 2's epochs, both arms")
    args = parser.parse_args(argv)
    rows = [run_arm(args.workdir, arm, seed, args.epochs) for seed in args.seeds for arm in ARMS]
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "two_stage_demo.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
