"""`make demo` on CPU: the reference engine on the embedded pair, every mode, losslessness checked.

The embedded pair lives in `dflash_sglang/data/pairs/demo` once a trained one is shipped; until then the demo
builds a tiny random pair and says so (a random drafter accepts ~1 token per step: it shows the machinery and
the losslessness, not a speed-up).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from dflash_sglang.engine import DFlashEngine
from dflash_sglang.verify import SamplingParams

EMBEDDED_PAIR = "data/pairs/demo"


def embedded_pair() -> tuple[Path, Path] | None:
    root = resources.files("dflash_sglang") / EMBEDDED_PAIR
    if not root.is_dir():
        return None
    root = Path(str(root))
    return root / "target", root / "drafter"


def demo_prompts(target: Path, count: int = 4) -> list[list[int]]:
    prompts_file = target.parent / "heldout_prompts.json"
    if prompts_file.is_file():
        import json

        return json.loads(prompts_file.read_text())[:count]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (5, 17, 9, 30)][:count]


def run_demo(workdir: Path, max_new_tokens: int = 96) -> int:
    pair = embedded_pair()
    if pair is None:
        from dflash_sglang.tiny import make_tiny

        pair = make_tiny("qwen3", workdir / "pair", vocab_size=512, block_size=16)
        print("demo pair: tiny random qwen3 target + RANDOM drafter (no trained pair shipped yet): "
              "expect acceptance ~1.0; this shows losslessness, not speed")
    else:
        print(f"demo pair: embedded trained pair {pair[0].parent}")
    target, drafter = pair
    engine = DFlashEngine.load(target, drafter, dtype=torch.float32)
    prompts = demo_prompts(target)
    params = SamplingParams()
    rows = []
    reference = None
    for mode in ("ar", "chain", "tree"):
        result = engine.generate(prompts, max_new_tokens, mode=mode, params=params)
        if mode == "ar":
            reference = result.tokens
        same = sum(a == b for a, b in zip(result.tokens, reference))
        rows.append((mode, result.num_generated / result.seconds, result.mean_acceptance, result.target_forwards,
                     f"{same}/{len(prompts)}"))
    print(f"{'mode':<6} {'tok/s':>8} {'accept':>7} {'target fwd':>10} {'== ar':>6}")
    for mode, tps, acc, fwd, same in rows:
        print(f"{mode:<6} {tps:>8.1f} {acc if mode != 'ar' else 1.0:>7.2f} {fwd:>10d} {same:>6}")
    return 0
