"""A pinned loss history of the real demo run: a silent change in training shows here.

The demo (tiny LLaVA, synthetic scans, 4-bit base, LoRA + projector + head, 8 epochs)
is run once per session by the `demo_run` fixture through the command line; its
`metrics.json` loss history must match the pinned one to rtol 1e-5 (atol 1e-6 for the
late losses near 0.01). Measured: bit-identical from run to run at one thread count;
1 vs 2 CPU threads differ by at most 2.9e-7 (1.1e-5 relative). After a deliberate
change to training, data or the demo, regenerate it:

    LMMTUNE_UPDATE_GOLDEN=1 python -m pytest tests/training/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "demo_loss_history.json"


def test_demo_loss_history_matches_the_pinned_one(demo_run):
    got = json.loads((demo_run["run_dir"] / "metrics.json").read_text())["train"]["loss_history"]
    pinned = json.loads(GOLDEN.read_text())
    if os.environ.get("LMMTUNE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({**pinned, "loss_history": got}, indent=1) + "\n")
        pytest.skip(f"rewrote {GOLDEN}")
    assert len(got) == len(pinned["loss_history"])
    np.testing.assert_allclose(got, pinned["loss_history"], rtol=1e-5, atol=1e-6)
    assert got[-1] < got[0] / 100  # and it is a loss that falls
