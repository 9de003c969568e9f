"""scripts/device/profile_train.py end to end on CPU with a small target: every batch order (and the bucketed one with
the target's outputs cached), every phase timed."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_profile_train_runs_every_order_and_times_every_phase(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "device" / "profile_train.py"), "--out", str(tmp_path), "--tiny",
           "--device", "cpu", "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--batch-size", "4",
           "--num-anchors", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "profile-train.json").read_text())
    assert [r["order"] for r in report["results"]] == ["length-bucketed", "bucketed, cached", "random"]
    for r in report["results"]:
        assert r["steps"] == 2 and r["ms_per_step"] > 0 and r["top_kernels_ms_per_step"]
        assert set(r["phase_ms"]) == {"target", "drafter", "loss", "backward", "optimizer"}
        assert all(ms > 0 for ms in r["phase_ms"].values())
        # The phases tile the step: their sum is the step minus what runs before the first mark (batch padding).
        assert sum(r["phase_ms"].values()) <= r["ms_per_step"] * 1.05
    assert [line.split("  ")[0] for line in run.stdout.splitlines()[-3:]] == ["length-bucketed", "bucketed, cached",
                                                                             "random"]
