"""The `check` and `predict` commands.

`python -m lmmtune check [recipe=...] data.train=...`: validate the data, print a report.

It runs the checks training runs first (`lmmtune.data.checks.inspect_data`), with the
processor only (tokenizer and image processor, to count tokens): no model is loaded,
so it takes seconds on a laptop, before any GPU hour is spent. Exits 1 if any
record is invalid; warnings (duplicate ids, images in train and eval) do not fail it.

With `train.gpu_memory_gb=N` it also runs the memory planner on the longest training
sample, as training would (the model's config only): the micro-batch and
accumulation it picks, or exit 1 when the recipe cannot fit N GiB.

`python -m lmmtune predict`: answer questions about images with the adapted model.

    python -m lmmtune predict output_dir=RUN predict.image=scan.png predict.question="Is there a lesion?"
    python -m lmmtune predict predict.model=RUN/export-merged predict.input=questions.jsonl predict.output=answers.jsonl

The model is the run's base with its adapter (quantized as trained), or an export
(`predict.model=DIR`: a merged model, or an adapter export). Prompts and image padding
are the ones training used; decoding is greedy.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.config import Config
from lmmtune.data.batches import TokenizedConversation
from lmmtune.data.checks import checked_question, inspect_data
from lmmtune.data.records import Sample
from lmmtune.data.report import DataReport, format_report
from lmmtune.errors import LmmtuneError
from lmmtune.eval.generate import generate_answers
from lmmtune.rundir.files import write_text_atomic
from lmmtune.rundir.folders import owning_folder


def check(cfg: Config) -> DataReport | dict[str, DataReport]:
    """Check the data set (and the memory plan), print the report, raise LmmtuneError
    if any record is invalid or the recipe cannot fit `train.gpu_memory_gb`. A two-stage
    config: both stages' data, each report under its stage's title (by stage name)."""
    if cfg.two_stage.enabled:
        return check_two_stage(cfg)
    from lmmtune.model import load_processor

    processor = load_processor(cfg.model)
    with tempfile.TemporaryDirectory(prefix="lmmtune-check-") as work_dir:  # `demo` writes here
        data_cfg = stage_data(cfg, Path(work_dir))
        report = inspect_data(data_cfg, processor, Path(work_dir), pairs_only=cfg.dpo.enabled)
    print(format_report(report), flush=True)
    if report.problems:
        valid = report.records - report.invalid_records
        raise LmmtuneError(
            f"{report.invalid_records} invalid record(s) of {report.records}, listed above; "
            f"fix them, or train with data.on_error=skip to use the {valid} valid ones"
        )
    if not report.train:
        from lmmtune.data.checks import empty_training_set

        raise LmmtuneError(empty_training_set(report, cfg.data.train))
    if cfg.train.gpu_memory_gb is not None:
        print(memory_plan(cfg, report), flush=True)
    return report


def check_two_stage(cfg: Config) -> dict[str, DataReport]:
    """`check` of each stage of a two-stage config, both reported before either refuses."""
    from lmmtune.stage_configs import each_stage, stage_configs

    reports, refusals = {}, []
    for name, title, stage_cfg in each_stage(stage_configs(cfg)):
        print(f"== {title}: data.train={stage_cfg.data.train}", flush=True)
        try:
            reports[name] = check(stage_cfg)
        except LmmtuneError as exc:
            refusals.append(f"{title}: {exc}")
    if refusals:
        raise LmmtuneError("\n".join(refusals))
    return reports


def memory_plan(cfg: Config, report: DataReport) -> str:
    """The planner's choice for the longest sample training will see, as a report line."""
    from lmmtune.training.memory import fit_to_memory

    grouped = report.group_by_image and report.grouping is not None
    lengths = report.grouping.lengths if grouped else report.train_lengths
    longest = max(lengths, default=1)  # what training plans with
    sequences = 2 if cfg.dpo.enabled else 1  # a preference pair: chosen and rejected
    planned = fit_to_memory(
        cfg.train, cfg.model, cfg.quant, cfg.peft, longest, sequences, cfg.stage
    )
    return (
        f"memory: fits train.gpu_memory_gb={cfg.train.gpu_memory_gb:g} at micro-batch "
        f"{planned.batch_size} x grad_accum {planned.grad_accum} (samples up to {longest} "
        "tokens; the modelled breakdown is in the log)"
    )


def stage_data(cfg: Config, work_dir: Path):
    """`data.*`, with `data.train=demo` meaning the demo pairs in the preference stage."""
    if not cfg.dpo.enabled:
        return cfg.data
    from lmmtune.demo import pair_data_config

    return pair_data_config(cfg.data, work_dir)


log = logging.getLogger(__name__)


def predict(cfg: DictConfig, overrides: list[str] | None = None) -> list[dict]:
    """Answer `predict.question` (about `predict.image`) or every line of `predict.input`."""
    predict_cfg = cfg.predict
    samples = questions(predict_cfg)
    check_output(predict_cfg)  # before the model loads
    model, processor, data_cfg = load_predictor(cfg, overrides)
    samples = answerable(samples, processor, data_cfg.max_length)
    answers = generate_answers(
        model,
        processor,
        samples,
        predict_cfg.max_new_tokens,
        predict_cfg.batch_size,
        data_cfg.max_image_pixels,
        "predict",
        share_image_prefix=predict_cfg.share_image_prefix,
    )
    rows = [
        {"id": s.id, "image": s.image, "question": s.turns[-1][0], "answer": a}
        for s, a in zip(samples, answers, strict=True)
    ]
    if predict_cfg.output:
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_text_atomic(Path(predict_cfg.output).expanduser(), "".join(lines))
        print(f"wrote {len(rows)} answer(s) to {predict_cfg.output}", flush=True)
    elif predict_cfg.input:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False), flush=True)
    else:
        print(rows[0]["answer"], flush=True)
    return rows


ANSWER_KEYS = ("id", "question", "answer")
"""Keys of every line predict writes: what marks a file as an earlier predict's answers."""


def check_output(predict_cfg) -> None:
    """`predict.output` is a new file, or with `predict.overwrite=true` answers an earlier
    predict wrote; never the input, a link, a folder, or a file of a folder lmmtune made."""
    if not predict_cfg.output:
        return
    path = Path(predict_cfg.output).expanduser()
    other = "choose another predict.output"
    owner = owning_folder(path)
    source = Path(predict_cfg.input).expanduser() if predict_cfg.input else None
    if path.is_symlink():
        problem = f"is a link: predict never writes through one; {other}"
    elif path.exists() and not path.is_file():
        problem = f"is not a file; {other}"
    elif owner is not None:
        problem = (
            f"belongs to the lmmtune folder {owner} (predict never replaces a file lmmtune "
            f"wrote, nor writes into an evaluation or export); {other}"
        )
    elif not path.exists():
        return
    elif source is not None and source.exists() and path.samefile(source):
        problem = f"is predict.input itself; {other}"
    elif not predict_cfg.overwrite:
        problem = f"exists: pass predict.overwrite=true to replace an earlier predict's answers, or {other}"
    elif not holds_answers(path):
        problem = (
            f"does not hold an earlier predict's answers (JSON lines with {', '.join(ANSWER_KEYS)})"
            f" and is never replaced; {other}"
        )
    else:
        return
    raise LmmtuneError(f"predict.output={predict_cfg.output} {problem}")


def holds_answers(path: Path) -> bool:
    """Whether every line of `path` is a JSON object with predict's keys (read line by line)."""
    try:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                if not isinstance(row, dict) or not all(key in row for key in ANSWER_KEYS):
                    return False
    except (OSError, ValueError, RecursionError):
        return False
    return True


def questions(predict_cfg) -> list[Sample]:
    """One question (`predict.question`, `predict.image`) or the records of `predict.input`."""
    if predict_cfg.input and (predict_cfg.question or predict_cfg.image):
        raise LmmtuneError(
            "pass either predict.input=FILE.jsonl or predict.question=... , not both"
        )
    if predict_cfg.input:
        return read_questions(Path(predict_cfg.input))
    if not predict_cfg.question:
        raise LmmtuneError(
            'nothing to answer: pass predict.question="..." (and predict.image=PATH), '
            "or predict.input=FILE.jsonl"
        )
    image = _image_path(predict_cfg.image, Path.cwd(), "predict.image")
    return [
        Sample(id="0", turns=[(predict_cfg.question, "")], image=image, source="predict.question")
    ]


def read_questions(path: Path) -> list[Sample]:
    """JSONL lines of `question`, optional `image` (relative to the file) and `id`."""
    if not path.is_file():
        raise LmmtuneError(f"predict.input: no such file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmmtuneError(f"predict.input: {path} is not UTF-8 text ({exc.reason})") from None
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmmtuneError(f"{where}: not JSON ({exc.msg})") from None
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise LmmtuneError(f"{where}: needs a 'question' (text)")
        if not isinstance(record.get("image"), str | None):
            raise LmmtuneError(f"{where}: 'image' must be a path (text)")
        image = _image_path(record.get("image"), path.parent, where)
        record_id = str(record.get("id", number))
        samples.append(Sample(record_id, [(record["question"].strip(), "")], image, source=where))
    if not samples:
        raise LmmtuneError(f"{path} holds no questions")
    return samples


def answerable(samples: list[Sample], processor, max_length: int) -> list[Sample]:
    """The questions checked as training checks its records, before any is tokenized for
    generation: one leading `<image>` dropped, other `<image>`s and special-token text
    refused, and no prompt longer than the `data.max_length` the model was trained with."""
    tokenize = TokenizedConversation(processor, max_length)
    checked = []
    for sample in samples:
        where = f"{sample.source}: the question"
        question = checked_question(
            sample.turns[-1][0], sample.image is not None, processor.tokenizer, max_length, where
        )
        sample = replace(sample, turns=[(question, "")])
        length = len(tokenize.prompt_ids(sample))
        if length > max_length:
            raise LmmtuneError(
                f"{where} makes a prompt of {length} tokens (image tokens included), past "
                f"data.max_length={max_length} the model was trained with; shorten it"
            )
        checked.append(sample)
    return checked


def _image_path(image: str | None, root: Path, where: str) -> str | None:
    if not image:
        return None
    path = Path(image).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise LmmtuneError(f"{where}: image not found: {path}")
    return str(path)


def load_predictor(cfg: DictConfig, overrides: list[str] | None):
    """The model (an export, or the base with an adapter), its processor, and the `data`
    settings to check the questions and open their images with (the run's, unless overridden;
    the command's own for a merged model outside a run)."""
    from lmmtune.finished_run import load_finished_run

    predict_cfg = cfg.predict
    run = load_finished_run(cfg, predict_cfg.adapter, predict_cfg.model, overrides)
    processor = run.processor
    return run.load_model(), processor, run.settings.data
