"""End-to-end run folders (scripts/device/e2e.sh's $OUT/e2e-NAME, unpacked here) -> one JSON for docs/results/.

Per group: pass/fail per contender, every /generate divergence from AR with AR's top-2 margin at the first
divergent token, and per contender tok/s by concurrency, mean acceptance length, the sampling smoke result,
whether the startup line was found, and greedy /v1/completions mismatches against AR's concurrency-1 texts;
contenders without a result (server or benchmark failed, or its time share ran out) are listed as such.

    python scripts/e2e_results.py RUN_DIR [RUN_DIR ...] --out docs/results/e2e-h200-DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
from e2e_client import completion_mismatches  # noqa: E402  (scripts/device is not a package)

CONTENDERS = ("ar", "builtin", "ours")


def group_result(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    results = {name: json.loads((run_dir / f"{name}.json").read_text())
               for name in CONTENDERS if (run_dir / f"{name}.json").exists()}
    reference = results.get("ar")
    contenders = {}
    for name, result in results.items():
        entry = {
            "tok_per_s": {c: round(run["tok_per_s"], 1) for c, run in result["runs"].items()},
            "accept_length": result.get("accept_length"),
            "sampling_smoke": result.get("sampling_smoke"),
            "startup_line_found": result.get("startup_line_found"),
        }
        if reference is not None:  # AR too: its concurrency-16 texts against its own concurrency-1 ones
            entry["completion_mismatches_vs_ar_c1"] = completion_mismatches(reference, result)
        contenders[name] = entry
    failed = sorted(set(summary["passed"]) - set(results))
    return {"passed": summary["passed"], "near_tie_tolerance": summary["near_tie_tolerance"],
            "generate_divergences": {n: d for n, d in summary["divergences"].items() if d},
            "num_prompts": next(iter(results.values()))["num_prompts"] if results else None,
            "no_result": failed, "contenders": contenders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    groups = {d.name.removeprefix("e2e-"): group_result(d) for d in args.run_dirs}
    args.out.write_text(json.dumps(groups, indent=1) + "\n")
    print(f"wrote {args.out}: {', '.join(groups)}")


if __name__ == "__main__":
    main()
