"""The shape stages' names and what each switches on: one table for scripts/device/shape.py and shape.sh.

Standard library only, so shape.sh can check its arguments and build a stage's flags without the repository's
torch imports:
  python3 scripts/device/shape_stages.py names            every stage name, space-separated, in summary order
  python3 scripts/device/shape_stages.py flags STAGE      "MODE N" on the first line (chain B / tree budget), then
                                                          the stage's own server flags (a tree's top-k among them)
"""

from __future__ import annotations

import re
import sys

TREE_BLOCK = 16  # the tree stages draft with the published block
TREE_TOPK = 4
# Chain blocks with a stage. B = 8 prices a shorter verify: on Qwen3-32B the 16-row verify alone cost 1.055x an AR
# step (2026-11-30), and the step's bar is 1.10x.
CHAIN_BLOCKS = (8, 16, 32, 64)
# The stages, in the order the summary lists them. bN: ours, chain, block N (one of CHAIN_BLOCKS); tN: tree mode, N
# draft nodes. Tree budgets 31 and 63 make N + 1 verify rows whole multiples of 32 and 64: on the H200 (2026-11-29,
# two runs) the verify cost +0.4 ms from 17 to 33 rows and +2.3 ms from 33 to 65, which is what a GEMM paying a
# second row tile for its 65th row would do. Suffixes, in this order (flags() below turns them into server flags):
# fp8, the drafter's projections in FP8 (--speculative-draft-model-quantization fp8); fh, the draft head in FP8
# (--speculative-dflash-draft-head-fp8); sk, the verify's attention on our split-KV kernel (on by default since
# 2026-11-30; without sk a stage passes --no-speculative-dflash-verify-splitkv), whose gain grows with the context
# (shape.sh --prompt-tokens).
STAGE_NAMES = ("ar", "b8", "b16", "b32", "b64", "b8fp8", "b16fp8", "b16sk", "b16fp8sk", "t16", "t31", "t32", "t63",
               "t64", "t31fp8", "t63fp8", "t31sk", "t63sk", "t31fp8sk", "t63fp8sk", "b16fp8fhsk", "t31fp8fhsk")
STAGE_NAME = re.compile(r"(?P<mode>[bt])(?P<n>\d+)(?P<fp8>fp8)?(?P<fh>fh)?(?P<sk>sk)?")


def stage_from_name(name: str) -> dict:
    """A stage's settings from its name: mode, the drafter's block, tree budget, and what its suffixes switch on."""
    if name == "ar":
        return {"mode": "ar", "block": None, "tree_budget": None}
    m = STAGE_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"stage {name!r}: not ar, bN or tN followed by any of fp8, fh, sk in that order")
    n = int(m["n"])
    stage = ({"mode": "chain", "block": n, "tree_budget": None} if m["mode"] == "b"
             else {"mode": "tree", "block": TREE_BLOCK, "tree_budget": n})
    if m["fp8"]:
        stage["draft_quantization"] = "fp8"
    if m["fh"]:
        stage["draft_head"] = "fp8"
    if m["sk"]:
        stage["verify_splitkv"] = True
    return stage


STAGES = {name: stage_from_name(name) for name in STAGE_NAMES}


def flags(name: str) -> list[str]:
    """The server flags a DFLASH stage's suffixes switch on, and a tree stage's top-k. Without sk a stage keeps
    SGLang's verify attention, as the stage names meant before split-KV became the default."""
    stage = STAGES[name]
    out = ["--speculative-dflash-topk", str(TREE_TOPK)] if stage["mode"] == "tree" else []
    out += ["--speculative-dflash-verify-splitkv" if stage.get("verify_splitkv")
           else "--no-speculative-dflash-verify-splitkv"]
    if stage.get("draft_head") == "fp8":
        out.append("--speculative-dflash-draft-head-fp8")
    if stage.get("draft_quantization") == "fp8":
        out += ["--speculative-draft-model-quantization", "fp8"]
    return out


def main(argv: list[str]) -> int:
    if argv == ["names"]:
        print(" ".join(STAGE_NAMES))
        return 0
    if len(argv) == 2 and argv[0] == "flags" and argv[1] in STAGES and argv[1] != "ar":
        stage = STAGES[argv[1]]
        print(stage["mode"], stage["block"] if stage["mode"] == "chain" else stage["tree_budget"])
        print(" ".join(flags(argv[1])))
        return 0
    print("usage: shape_stages.py names | flags STAGE (a DFLASH stage: " + " ".join(STAGE_NAMES[1:]) + ")",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
