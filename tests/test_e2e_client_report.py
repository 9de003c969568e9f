"""scripts/device/e2e_client.py report: the equality table the end-to-end runs print, on synthetic results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "scripts" / "device" / "e2e_client.py"


def result(texts: list[str], ids: list[list[int]], accept=None, margins=None) -> dict:
    out = {"runs": {"1": {"texts": texts, "tok_per_s": 10.0}, "16": {"texts": texts, "tok_per_s": 80.0}},
           "generate_ids": ids, "sampling_smoke": "ok", "startup_line_found": True}
    if accept is not None:
        out["accept_length"] = accept
    if margins is not None:
        out["top2_margins"] = margins
    return out


def report(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(CLIENT), "report", "--dir", str(folder), *args], env=env,
                          capture_output=True, text=True)


def write(folder: Path, **results: dict) -> None:
    for name, content in results.items():
        (folder / f"{name}.json").write_text(json.dumps(content))


def test_a_divergence_from_ar_fails_ours_with_its_margin_and_ours_equals_builtin(tmp_path):
    write(tmp_path,
          ar=result(["a", "b"], [[1, 2], [3, 4]], margins=[[2.0, 2.0], [2.0, 0.01]]),
          builtin=result(["a", "x"], [[1, 2], [3, 5]], accept=1.5),
          ours=result(["a", "x"], [[1, 2], [3, 5]], accept=1.5))
    ours = json.loads((tmp_path / "ours.json").read_text())
    ours["runs"]["16"]["tok_per_s"] = 100.0
    write(tmp_path, ours=ours)
    run = report(tmp_path, "--reference", "ar", "builtin", "ours", "--must-pass", "ours")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "ours: 1 /generate outputs diverge from AR" in run.stdout and "max 0.0100 (all near-ties" in run.stdout
    assert "ours vs builtin: identical /generate outputs on 2/2 prompts" in run.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] == {"ar": True, "builtin": False, "ours": False}
    assert summary["divergences"]["ours"] == [{"prompt": 1, "index": 1, "margin": 0.01}]
    assert summary["ours_equals_builtin"] == "2/2"
    assert summary["ours_over_builtin_tok_s"] == {"1": 1.0, "16": 1.25}
    assert "ours / builtin tok/s: c1 1.00x, c16 1.25x" in run.stdout


def test_a_reference_other_than_ar_compares_two_runs_of_ours(tmp_path):
    # tp2.sh: ours at TP=2 against ours at TP=1; the contender comes before --must-pass (it takes several names).
    same = result(["a", "b"], [[1, 2], [3, 4]], accept=2.0)
    write(tmp_path, **{"ours-tp1": same, "ours-tp2": same})
    run = report(tmp_path, "--reference", "ours-tp1", "ours-tp2", "--must-pass", "ours-tp2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS (ours-tp2: pass" in run.stdout and "ours vs builtin" not in run.stdout


def test_a_missing_contender_is_reported_as_failed(tmp_path):
    write(tmp_path, ar=result(["a"], [[1]]), ours=result(["a"], [[1]], accept=1.0))
    run = report(tmp_path, "--reference", "ar", "builtin", "ours", "--must-pass", "ours")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no results (see the group log)" in run.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["passed"]["builtin"] is False
