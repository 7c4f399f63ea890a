"""`python -m benchmarks.bench --configs lmmtune,dpo`: a DPO step beside an SFT step."""

from __future__ import annotations

import pytest

from tests.conftest import run_bench


@pytest.mark.slow
def test_bench_measures_a_dpo_step_beside_an_sft_step(tmp_path):
    report = run_bench(
        ["--configs", "lmmtune,dpo", "--steps", "2", "--warmup", "1"], tmp_path / "bench.json"
    )

    rows = {row["config"]: row for row in report["results"]}
    assert rows["lmmtune"]["status"] == rows["dpo"]["status"] == "ok"
    sft, dpo = rows["lmmtune"], rows["dpo"]
    # a pair is two sequences: a DPO step of n pairs reads about twice an SFT step's tokens
    assert 1.5 < (dpo["tokens"] / dpo["timed_steps"]) / (sft["tokens"] / sft["timed_steps"]) < 2.5
    assert dpo["planned_gib"] > sft["planned_gib"]  # the planner counts both sides
    (ratio,) = [r for r in report["ratios"] if r["pair"] == "lmmtune/dpo"]
    assert ratio["peak_memory"] > 0
