"""Compare drafter-recipe variants on CPU, on the embedded demo target, in a data-scarce regime like SmolLM2's.

    .venv/bin/python scripts/recipe_ablation.py --out DIR [--prompts 800] [--epochs 3] [--seeds 0 1]
        [--variant NAME:field=value,field=value ...]

The shipped demo target (`dflash_sglang/data/pairs/demo/target`, float32 here) answers `--prompts` prompts cut from
the Python standard library's training files (the demo pair's corpus split), once; every variant then trains a
drafter with the demo recipe (`train_demo_pair.DRAFTER`) overridden by its `TrainConfig` fields, for each seed, on
those same answers, and is scored by the real engine's greedy chain (B = 16) on the pair's held-out prompts.
Default variants: hard labels, and soft labels of weight 0.5 and 1 (`--soft-labels`). Writes DIR/ablation.json
and DIR/ablation.md (mean acceptance per variant and seed, the variant mean, final loss, seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_demo_pair as demo  # noqa: E402  (the demo pair's corpus, prompts and recipe)

DEFAULT_VARIANTS = ("hard:soft_labels=0", "soft-0.5:soft_labels=0.5", "soft-1:soft_labels=1")


def parse_variant(text: str, fields: dict) -> tuple[str, dict]:
    """`name:field=value,...` -> (name, overrides), values typed like the TrainConfig field's default."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a TrainConfig field")
        kind = type(fields[key].default) if fields[key].default is not None else float
        overrides[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return name, overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variant", action="append", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from dflash_sglang.engine import DFlashEngine
    from dflash_sglang.regenerate import regenerate
    from dflash_sglang.train import TrainConfig, train

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    variants = [parse_variant(v, fields) for v in (args.variant or DEFAULT_VARIANTS)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target_dir = demo.PAIR / "target"
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    train_files, _ = demo.corpus_files()
    prompts = demo.cut_prompts(tokenizer, train_files, args.prompts, random.Random(1234))
    heldout = json.loads((demo.PAIR / "heldout_prompts.json").read_text())
    started = time.perf_counter()
    records = regenerate(DFlashEngine.load(target_dir, None), prompts, demo.ANSWER_TOKENS, 64,
                         tokenizer.eos_token_id, progress=False)
    data = out / "regenerated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} answers in {time.perf_counter() - started:.0f}s", flush=True)

    runs = []
    for name, overrides in variants:
        for seed in args.seeds:
            settings = {**demo.DRAFTER, "epochs": args.epochs, "eval_every": 0, "num_eval_prompts": 1,
                        "progress": False, **overrides}
            work = out / f"{name}-seed{seed}"
            result = train(TrainConfig(target=str(target_dir), data=str(data), out=str(work), seed=seed,
                                       save_dtype="float32", **settings))
            engine = DFlashEngine.load(target_dir, work, dtype=torch.float32)
            chain = engine.generate(heldout, demo.EVAL_NEW_TOKENS, mode="chain", block_size=16)
            runs.append({"variant": name, "overrides": overrides, "seed": seed, "steps": result.steps,
                         "final_loss": round(result.final_loss, 4), "seconds": round(result.seconds, 1),
                         "heldout_acceptance": round(chain.mean_acceptance, 3)})
            print(json.dumps(runs[-1]), flush=True)

    means = {name: round(statistics.mean(r["heldout_acceptance"] for r in runs if r["variant"] == name), 3)
             for name, _ in variants}
    report = {"prompts": args.prompts, "answer_tokens": demo.ANSWER_TOKENS, "epochs": args.epochs,
              "seeds": args.seeds, "recipe": demo.DRAFTER, "heldout_prompts": len(heldout), "runs": runs,
              "mean_acceptance": means}
    (out / "ablation.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Demo target, {args.prompts} regenerated answers x {demo.ANSWER_TOKENS} tokens, {args.epochs} epochs, "
             f"held-out acceptance (B = 16 greedy chain, {len(heldout)} prompts).", "",
             "| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | final loss |",
             "|---|" + "---:|" * (len(args.seeds) + 2)]
    for name, _ in variants:
        mine = [r for r in runs if r["variant"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{r['heldout_acceptance']:.3f}" for r in mine)
                     + f" | {means[name]:.3f} | " + ", ".join(f"{r['final_loss']:.3f}" for r in mine) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
