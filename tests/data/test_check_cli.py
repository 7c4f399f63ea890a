"""`python -m lmmtune check` as a user runs it: the report, the exit code, no traceback."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.data.helpers import chat, llava, save_image, write_json


def test_check_reports_problems_and_exits_1(tmp_path):
    for name in ("a", "b"):
        save_image(tmp_path / "img" / f"{name}.png")
    (tmp_path / "img" / "c.png").write_bytes(b"")
    multi = llava("m", "img/b.png")
    multi["conversations"] += [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "no"}]
    records = [
        llava("a", "img/a.png"),
        multi,
        llava("t", None, "Define lesion.", "An abnormal area."),
        llava("a", "img/missing.png"),
        llava("z", "img/c.png"),
        {
            "id": "e",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}],
        },
    ]
    data = write_json(tmp_path / "train.json", records)

    result = run_cli(
        ["check", "model=tiny", f"data.train={data}", "data.eval_fraction=0"], cwd=tmp_path
    )

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(
        "lmmtune check: error: 3 invalid record(s) of 6, listed above; fix them, or train "
        "with data.on_error=skip to use the 3 valid ones"
    )
    report = result.stdout
    for line in [
        f"  train: {data} (6 records)",
        "records: 6 read, 3 valid, 3 invalid",
        "  kinds: 2 with image, 1 text-only, 2 single-turn, 1 multi-turn",
        "tokens per sample (16 per image included): min 41 / median 52 / max 60; "
        "0 over data.max_length=2048",
        "tokens per answer: min 1 / median 1 / max 6",
        "problems (invalid records): 3",
        f"  missing image file (1):\n    {data}[3] (id a): image not found: "
        f"{tmp_path / 'img' / 'missing.png'}",
        f"  zero-byte image file (1):\n    {data}[4] (id z): zero-byte image file: "
        f"{tmp_path / 'img' / 'c.png'}",
        f"  empty answer (1):\n    {data}[5] (id e): empty answer (message 1)",
        "warnings (records still used): 1",
        f"  duplicate id (1):\n    {data}[3] (id a): duplicate id 'a' (first at {data}[0])",
    ]:
        assert line in report, f"{line!r} not in\n{report}"


def test_check_passes_a_good_set(good_set, capsys):
    # The same function the CLI's check branch calls, in-process (a subprocess costs ~10 s).
    from lmmtune.commands import check
    from lmmtune.config import Config, DataConfig, ModelConfig

    cfg = Config(
        data=DataConfig(train=str(good_set), num_workers=0), model=ModelConfig(path="tiny")
    )
    report = check(cfg)

    printed = capsys.readouterr().out
    assert (report.records, report.invalid_records) == (4, 0)
    assert (len(report.train), len(report.eval)) == (4, 0)  # 5% of 4 rounds to 0 eval records
    assert "records: 4 read, 4 valid, 0 invalid" in printed
    assert "problems (invalid records): none" in printed


def test_check_with_a_memory_budget_prints_the_plan_or_fails(good_set, capsys):
    from lmmtune.commands import check
    from lmmtune.config import Config, DataConfig, ModelConfig, TrainConfig
    from lmmtune.errors import LmmtuneError

    data, model = DataConfig(train=str(good_set), num_workers=0), ModelConfig(path="tiny")
    budget = TrainConfig(batch_size=1, grad_accum=8, gpu_memory_gb=8)
    report = check(Config(data=data, model=model, train=budget))
    printed = capsys.readouterr().out
    assert "memory: fits train.gpu_memory_gb=8 at micro-batch 8 x grad_accum 1" in printed
    assert f"(samples up to {max(report.train_lengths)} tokens" in printed  # the longest sample
    too_small = TrainConfig(batch_size=1, grad_accum=8, gpu_memory_gb=0.5)
    with pytest.raises(LmmtuneError, match="does not fit train.gpu_memory_gb=0.5"):
        check(Config(data=data, model=model, train=too_small))


def test_check_names_records_that_would_teach_the_wrong_thing(tmp_path):
    """Special-token text in a message, an image placeholder in a later turn: invalid, named."""
    save_image(tmp_path / "img" / "a.png")
    later_image = llava("later", "img/a.png")
    later_image["conversations"][0]["value"] = "Is there a lesion?"
    later_image["conversations"] += [
        {"from": "human", "value": "<image>\nAnd here?"},
        {"from": "gpt", "value": "no"},
    ]
    later_chat = {
        "id": "chat",
        "images": ["img/a.png"],
        "messages": [
            chat("user", "Hello?"),
            chat("assistant", "Hi."),
            chat("user", "What is this?", image=True),
            chat("assistant", "A scan."),
        ],
    }
    records = [
        llava("ok", "img/a.png"),
        llava("eos", "img/a.png", answer="yes</s> and more"),
        llava("bos", None, "Say hi.", "<s>hi"),
        llava("pad", "img/a.png", answer="none<pad>"),
        llava("unk", None, "What is <unk>?", "unknown"),
        later_image,
        later_chat,
    ]
    data = write_json(tmp_path / "train.json", records)
    result = run_cli(
        ["check", "model=tiny", f"data.train={data}", "data.eval_fraction=0"], cwd=tmp_path
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    report = result.stdout
    special = "the text of a special token: it would be trained as that token"
    for line in [
        f"{data}[1] (id eos): the answer of turn 1 contains '</s>', {special}",
        f"{data}[2] (id bos): the answer of turn 1 contains '<s>', {special}",
        f"{data}[3] (id pad): the answer of turn 1 contains '<pad>', {special}",
        f"{data}[4] (id unk): the question of turn 1 contains '<unk>', {special}",
        f"{data}[5] (id later): '<image>' in a later question (message 2)",
        f"{data}[6] (id chat): '<image>' in a later question (message 2)",
        "records: 7 read, 1 valid, 6 invalid",
    ]:
        assert line in report, f"{line!r} not in\n{report}"


def test_an_empty_training_set_fails_check_and_train_in_one_line(tmp_path):
    data = write_json(tmp_path / "train.json", [])
    for command in (["check"], ["train", "output_dir=run", "tracking.backend=none"]):
        result = run_cli([*command, "model=tiny", f"data.train={data}"], cwd=tmp_path)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().endswith("holds no records: nothing to train on")
    assert not (tmp_path / "run").exists()  # the failed start leaves no folder to block a retry
