"""`python -m benchmarks.bench --grouping`: per-image grouping against one sample per question.

Trains the same model on the same VQA-RAD-shaped set (`benchmarks.bench.vqa_set`) with
lmmtune's own training stage, once per arm and seed, and reports per arm: tokens and
wall time per epoch, and held-out accuracy after the same number of epochs.

- `per-question`: one sample per question (data.group_by_image=false), batch
  `questions_per_step` (10) questions;
- `grouped`: data.group_by_image=true, one conversation per step (~10 turns): the same
  supervision per optimizer step, and about the same number of steps per epoch;
- `grouped-batch`: grouped with the per-question batch size (the naive equal-batch
  comparison: ~10x the supervision per step, ~10x fewer steps per epoch).

The model has LLaVA 1.5's image geometry, so every image is 576 tokens: CLIP ViT-L/14
at 336 px at full width (hidden 1024, 16 heads, MLP 4096) with its depth reduced to
`vision_layers` (1), a 128-wide 2-layer Llama with the 32,064-token vocabulary, and the
real Llama-2 tokenizer (`benchmarks.llama_tokenizer`). The weights are random (no
download); the task is learnable from the pixels.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import shlex
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from benchmarks.bench.eval_sharing import measure_eval_sharing
from benchmarks.bench.models import CLIP_L_336, llava_layout
from benchmarks.bench.report import environment
from benchmarks.bench.run import StepTimer
from benchmarks.bench.vqa_set import write_vqa_set
from benchmarks.llama_tokenizer import llama2_processor_dir
from lmmtune.api import check_data, compose_config
from lmmtune.demo import default_cache_dir
from lmmtune.stages.sft import SFTRecipe
from lmmtune.validate import validate

log = logging.getLogger(__name__)
TEXT = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
VISION_POSITION_SCALE = 20.0
"""As the demo's tiny model: random patch embeddings drown CLIP's position embeddings, so
they are scaled up for the side and half of a lesion to survive a random tower."""
ARMS = ("per-question", "grouped", "grouped-batch")


@dataclass(frozen=True)
class GroupingSettings:
    """What the benchmark trains: the set's size, the arms' epochs and batches, the seeds."""

    train_images: int = 48
    eval_images: int = 12
    epochs: int = 3
    questions_per_step: int = 10
    """Per-question batch size; the grouped arm trains one conversation (~10 questions) a step."""
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    vision_layers: int = 1
    learning_rate: float = 2e-3
    evaluate: bool = True
    """Held-out accuracy after training (False: tokens and time only)."""


def bench_config(vision_layers: int) -> LlavaConfig:
    """LLaVA 1.5's image geometry (576 tokens of CLIP-L/336) on a 128-wide Llama."""
    return llava_layout(
        TEXT,
        {**CLIP_L_336, "num_hidden_layers": vision_layers},
        feature_layer=-1,  # the last of the reduced tower's layers: none runs for nothing
        initializer_range=TEXT["hidden_size"] ** -0.5,  # signals keep their scale at this width
    )


def bench_checkpoint(
    processor_dir: Path, vision_layers: int, cache_dir: Path | None = None
) -> Path:
    """The random-init model with the processor of `processor_dir`, built once per shape."""
    config = bench_config(vision_layers)
    key = json.dumps([config.to_dict(), VISION_POSITION_SCALE, processor_dir.name], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    target = (cache_dir or default_cache_dir()) / "bench" / f"llava-grouping-{digest}"
    if (target / "config.json").exists():
        return target
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.mul_(VISION_POSITION_SCALE)
    tmp = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for file in processor_dir.iterdir():
        shutil.copy(file, tmp / file.name)
    try:
        tmp.rename(target)  # atomic: a half-written model is never picked up
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class CountingCollator:
    """The stage's collator, counting the tokens (padding left out) of every batch it builds."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0

    def __call__(self, features: list[dict]) -> dict:
        self.tokens += sum(len(feature["input_ids"]) for feature in features)
        return self.collator(features)


class TimedSFT(SFTRecipe):
    """lmmtune's training stage, its optimizer steps timed (wall and CPU seconds) and the
    tokens it trains on counted."""

    def callbacks(self) -> list:
        self.timer = StepTimer(cuda=torch.cuda.is_available())
        return [*super().callbacks(), self.timer]

    def build_trainer(self):
        trainer = super().build_trainer()
        self.counter = trainer.data_collator = CountingCollator(trainer.data_collator)
        return trainer


def arm_overrides(settings: GroupingSettings, arm: str, seed: int, files, model: Path, out: Path):
    """The command-line settings of one arm's run (as `python -m lmmtune ...` takes them)."""
    grouped = arm != "per-question"
    batch = 1 if arm == "grouped" else settings.questions_per_step
    train, evaluation = files
    return [
        "name=bench-grouping", f"output_dir={out}", "tracking=none",
        f"model.path={model}", "model.dtype=float32", "quant.compute_dtype=float32",
        "peft.r=16", "peft.alpha=32", "peft.dropout=0.0", "peft.train_lm_head=true",
        f"peft.projector_lr={settings.learning_rate}",
        f"data.train={train}", f"data.eval={evaluation}", "data.num_workers=0",
        "data.max_eval_samples=null", f"data.group_by_image={str(grouped).lower()}",
        f"train.epochs={settings.epochs}", f"train.batch_size={batch}", "train.grad_accum=1",
        f"train.learning_rate={settings.learning_rate}", "train.optim=adamw_torch",
        "train.warmup_ratio=0.05", "train.gradient_checkpointing=false",
        "train.logging_steps=5", "train.save_steps=100000", f"train.seed={seed}",
        "eval.before=false", f"eval.after={str(settings.evaluate).lower()}",
        "eval.max_new_tokens=8", "eval.batch_size=16",
    ]  # fmt: skip


def run_arm(settings: GroupingSettings, arm: str, seed: int, files, model: Path, out: Path) -> dict:
    """Train one arm with one seed through lmmtune's stage; its epoch times and eval."""
    cfg = compose_config(arm_overrides(settings, arm, seed, files, model, out))
    validate(cfg, "train")
    recipe = TimedSFT(cfg)
    metrics = recipe.run()
    wall, cpu = recipe.timer.step_seconds(), recipe.timer.step_cpu_seconds()
    after = metrics.get("eval_after", {})
    return {
        "arm": arm,
        "seed": seed,
        "steps": len(wall),
        "epoch_tokens": recipe.counter.tokens // settings.epochs,
        "epoch_seconds": sum(wall) / settings.epochs,
        "epoch_cpu_seconds": sum(cpu) / settings.epochs if cpu else None,
        "final_loss": (metrics["train"]["loss_history"] or [None])[-1],
        "accuracy": after.get("accuracy"),
        "open_recall": after.get("open_recall"),
        "exact_match": after.get("exact_match"),
    }


def data_check(settings: GroupingSettings, files, model: Path, out: Path) -> dict:
    """The data check's epoch both ways (`python -m lmmtune check` prints the same line)."""
    cfg = compose_config(arm_overrides(settings, "grouped", 0, files, model, out))
    grouping = check_data(cfg).grouping
    return {
        "samples": grouping.samples,
        "conversations": len(grouping.conversations),
        "tokens_per_question": grouping.tokens_before,
        "tokens_grouped": grouping.tokens_after,
        "line": grouping.describe(),
    }


def run_benchmark(settings: GroupingSettings, workdir: Path, model: Path | None = None) -> dict:
    """Every arm with every seed on one data set and `model` (default: the benchmark's
    CLIP-L/336 model, built once); the rows and their summary."""
    if model is None:
        processor = llama2_processor_dir(legacy=False)
        model = bench_checkpoint(processor, settings.vision_layers)
    files = write_vqa_set(workdir / "data", settings.train_images, settings.eval_images)
    check = data_check(settings, files, model, workdir / "check")
    rows = []
    for seed in settings.seeds:
        for arm in settings.arms:
            log.info("grouping benchmark: %s, seed %d", arm, seed)
            rows.append(run_arm(settings, arm, seed, files, model, workdir / f"{arm}-{seed}"))
    return {
        "settings": asdict(settings),
        "data_check": check,
        "rows": rows,
        "arms": {arm: summarize([r for r in rows if r["arm"] == arm]) for arm in settings.arms},
        "eval_sharing": eval_sharing(workdir / f"grouped-{settings.seeds[0]}", settings),
    }


def eval_sharing(run_dir: Path, settings: GroupingSettings) -> dict | None:
    """The eval speed-up of sharing each image's prefix (eval.share_image_prefix), on the
    held-out questions with the grouped arm's trained model; None without that arm."""
    if "grouped" not in settings.arms or not settings.evaluate:
        return None
    from lmmtune.finished_run import load_finished_run

    run = load_finished_run(run_dir)
    model, processor = run.load_model(), run.processor
    return measure_eval_sharing(model, processor, run.eval_samples())


def summarize(rows: list[dict]) -> dict:
    """Mean and spread (sample standard deviation) over the seeds of one arm."""
    keys = (
        "epoch_tokens",
        "steps",
        "epoch_seconds",
        "epoch_cpu_seconds",
        "accuracy",
        "open_recall",
    )
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key] = {"mean": statistics.fmean(values), "sd": spread}
    return summary


def ratios(arms: dict) -> dict:
    """Per-question over grouped: how many times fewer tokens, wall and CPU seconds an epoch."""
    base, grouped = arms.get("per-question"), arms.get("grouped")
    if not base or not grouped:
        return {}
    keys = ("epoch_tokens", "epoch_seconds", "epoch_cpu_seconds")
    return {key: base[key]["mean"] / grouped[key]["mean"] for key in keys if key in base}


def markdown(report: dict) -> str:
    """The report as a table: one row per arm, mean ± spread over the seeds."""
    check, settings = report["data_check"], report["settings"]
    lines = [
        f"data check: {check['line']}",
        f"{settings['epochs']} epochs, seeds {settings['seeds']}, {settings['train_images']} "
        f"train / {settings['eval_images']} held-out images, vision layers "
        f"{settings['vision_layers']}",
        "",
        "| arm | tokens / epoch | steps | wall s / epoch | CPU s / epoch | closed accuracy | open recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, summary in report["arms"].items():
        cells = [_cell(summary.get(key), spec) for key, spec in CELLS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    shown = ", ".join(f"{key} {value:.2f}x" for key, value in report["ratios"].items())
    lines += ["", f"per-question / grouped: {shown}"]
    sharing = report.get("eval_sharing")
    if sharing:
        lines.append(
            f"eval with the image prefix shared: {sharing['per_question_s']:.1f} s -> "
            f"{sharing['shared_s']:.1f} s ({sharing['ratio']:.2f}x), answers equal: "
            f"{sharing['answers_equal']}"
        )
    return "\n".join(lines) + "\n"


CELLS = (
    ("epoch_tokens", ",.0f"),
    ("steps", ".0f"),
    ("epoch_seconds", ".1f"),
    ("epoch_cpu_seconds", ".1f"),
    ("accuracy", ".3f"),
    ("open_recall", ".3f"),
)


def _cell(value: dict | None, spec: str) -> str:
    if value is None:
        return "-"
    if value["sd"] == 0:
        return format(value["mean"], spec)
    return f"{format(value['mean'], spec)} ± {format(value['sd'], spec)}"


def main(args) -> dict:
    """Run the grouping benchmark with the parsed options; write its JSON and table."""
    settings = GroupingSettings(
        train_images=args.train_images,
        eval_images=args.eval_images,
        epochs=args.epochs,
        seeds=tuple(args.seeds),
        vision_layers=args.vision_layers,
        arms=args.arms,
        evaluate=args.eval,
    )
    with tempfile.TemporaryDirectory(prefix="lmmtune-bench-grouping-") as tmp:
        report = run_benchmark(settings, Path(tmp))
    report["ratios"] = ratios(report["arms"])
    report["environment"] = environment(args.command)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {out} and {out.with_suffix('.md')}")
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = GroupingSettings()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench --grouping", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--grouping", action="store_true", required=True)
    parser.add_argument("--train-images", type=int, default=defaults.train_images)
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument(
        "--vision-layers", type=int, default=defaults.vision_layers, help="CLIP-L/336 depth"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated from {ARMS}")
    parser.add_argument(
        "--eval", action=argparse.BooleanOptionalAction, default=True, help="held-out accuracy"
    )
    parser.add_argument("--out", type=Path, help="JSON results (a .md table is written next to it)")
    args = parser.parse_args(argv)
    args.arms = tuple(args.arms.split(","))
    if unknown := set(args.arms) - set(ARMS):
        parser.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or Path("outputs") / "bench" / f"grouping-{stamp}.json"
    args.command = "python -m benchmarks.bench " + shlex.join(argv)
    return args
