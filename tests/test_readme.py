"""The README's two quick-start commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", readme)[:2]


def test_readme_starts_with_setup_and_demo_then_tests():
    demo, tests = _readme_commands()
    assert demo.startswith("pip install torch==2.13.0") and demo.endswith(
        "python -m lmmtune recipe=demo"
    )
    assert tests.startswith("pip install torch==2.13.0") and tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_readme_predict_example_asks_a_demo_question_about_a_demo_image():
    from lmmtune.demo import PRESENCE_QUESTION, SIDE_QUESTION

    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"python -m lmmtune predict output_dir=RUN.+?\n.+?\n", readme)
    question = re.search(r'predict\.question="([^"]+)"', example).group(1)
    assert question in (PRESENCE_QUESTION, SIDE_QUESTION)
    assert "predict.image=RUN/demo_data/images/" in example


def test_readme_command_table_lists_exactly_the_registered_commands():
    from lmmtune.cli import COMMANDS

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| command | what |") :].split("\n\n")[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert listed == set(COMMANDS)
