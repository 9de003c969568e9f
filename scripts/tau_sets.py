"""Acceptance length tau per prompt set from the reference engine: exact greedy decoding in float32, no server.

The benchmark's sets stage (bench.sh) measures tau through SGLang in bf16 over a few prompts per set at
concurrency 1; this gives the same figure (completion tokens / verify steps, bonus token included, mean over
requests; the chat template; up to --max-new-tokens; stopping at EOS) over as many prompts as time allows, on the
CPU or a GPU, for chain and tree drafting.

    python scripts/tau_sets.py --target T --drafter D [--sets math500 humaneval] [--limit 48] [--modes chain tree]
        [--tree-budget 64 --tree-topk 4] [--batch-size 8] [--device cpu] --out tau.json

Prints a markdown table last (rows: modes; columns: sets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dflash_sglang.engine import DFlashEngine  # noqa: E402
from dflash_sglang.prompts import PROMPT_SETS, load_prompt_set, prompt_ids  # noqa: E402


def request_taus(result) -> list[float]:
    """tau of each request: its tokens over its verify steps."""
    return [len(tokens) / len(steps) for tokens, steps in zip(result.tokens, result.acceptance_lengths) if steps]


def measure(engine: DFlashEngine, prompts: list[list[int]], mode: str, args, eos: int | None) -> dict:
    taus, tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        result = engine.generate(prompts[start:start + args.batch_size], args.max_new_tokens, mode=mode,
                                 tree_budget=args.tree_budget if mode == "tree" else None, tree_topk=args.tree_topk,
                                 eos_token_id=eos)
        taus += request_taus(result)
        tokens += result.num_generated
        seconds += result.seconds
    return {"tau": statistics.fmean(taus), "requests": len(taus), "tokens": tokens, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--sets", nargs="+", choices=PROMPT_SETS, default=["math500", "humaneval"])
    parser.add_argument("--limit", type=int, default=48, help="first N prompts of each set")
    parser.add_argument("--modes", nargs="+", choices=("chain", "tree"), default=["chain", "tree"])
    parser.add_argument("--tree-budget", type=int, default=64)
    parser.add_argument("--tree-topk", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    engine = DFlashEngine.load(args.target, args.drafter, dtype=torch.float32, device=args.device)
    results = {}
    for mode in args.modes:
        for name in args.sets:
            prompts = [prompt_ids(tokenizer, row["prompt"], chat=True) for row in load_prompt_set(name, args.limit)]
            started = time.perf_counter()
            results.setdefault(mode, {})[name] = measure(engine, prompts, mode, args, tokenizer.eos_token_id)
            print(f"{mode} {name}: tau {results[mode][name]['tau']:.2f} over {len(prompts)} prompts "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                            "results": results}, indent=1) + "\n")
    print(f"\n| mode | {' | '.join(args.sets)} |\n|---|{'---:|' * len(args.sets)}")
    for mode, per_set in results.items():
        label = f"tree of {args.tree_budget} (top-{args.tree_topk})" if mode == "tree" else "chain"
        taus = [f"{per_set[name]['tau']:.2f}" for name in args.sets]
        print(f"| {label} | {' | '.join(taus)} |")


if __name__ == "__main__":
    main()
