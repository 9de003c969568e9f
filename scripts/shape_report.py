"""gemma4_shape.sh's summary.json -> docs/results/gemma4-31b-shape-DATE.md (+ the JSON beside it).

    python scripts/shape_report.py out/gemma4-shape/summary.json [MORE.json ...] [--out-dir docs/results]

Several summaries (e.g. `--stages "ar b16"` in one device command, `--stages "b32 b64"` in the next) are merged
stage by stage: a stage measured ("ok") in a later file replaces the earlier one. The derived numbers (break-even
acceptance length, the bound at the published tau) are recomputed from the merged stages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))

from gemma4_shape import PUBLISHED_TAU_B16, derive  # noqa: E402

COMMAND = "source .device/unpack.sh && bash scripts/device/gemma4_shape.sh"


def merge(summaries: list[dict]) -> dict:
    merged = json.loads(json.dumps(summaries[0]))
    for summary in summaries[1:]:
        for name, stage in summary["stages"].items():
            if stage["status"] == "ok" or merged["stages"][name]["status"] != "ok":
                merged["stages"][name] = stage
    derive(merged["stages"])
    merged["merged_from_runs"] = [s.get("run", {}).get("started_utc") for s in summaries]
    return merged


def num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def stage_row(name: str, stage: dict) -> str:
    memory, client, timing = stage.get("memory", {}), stage.get("client", {}), stage.get("step_timing") or {}
    weights, graphs = memory.get("weights_gb", {}), memory.get("graph_gb", {})
    smi = (client.get("gpu_memory_serving") or {}).get("used_mib")
    status = stage["status"] + (f": {stage['reason']}" if stage.get("reason") else "")
    block = "-" if stage["block"] is None else str(stage["block"])
    cells = [name, block, status, num(stage.get("startup_s"), 0), num(weights.get("target")), num(weights.get("draft")),
             num(memory.get("kv_total_gb") if memory.get("kv_pools") else None),
             num(sum(graphs.values()) if graphs else None), num(memory.get("available_after_startup_gb")),
             num(smi / 1024 if smi else None, 1), num(client.get("ms_per_token")), num(client.get("ms_per_step")),
             num(client.get("accept_length")), num(timing.get("draft_ms")), num(timing.get("verify_ms")),
             num(timing.get("rest_ms")), num(timing.get("step_ms")), num(stage.get("break_even_tau_gpu")),
             num(stage.get("break_even_tau_e2e"))]
    return "| " + " | ".join(cells) + " |"


def render(summary: dict) -> str:
    run, stages = summary.get("run", {}), summary["stages"]
    gpu = (run.get("gpu") or {}).get("gpu", "GPU not recorded")
    t_ar = stages["ar"].get("client", {}).get("ms_per_token")
    lines = [
        f"# Gemma-4-31B shape under dflash_sglang, one {gpu} ({summary['date']})",
        "",
        f"`{COMMAND}` (summary JSON beside this file). Draft attention backend: "
        f"`{run.get('draft_backend', '?')}`; target attention `triton`; bf16; `--mem-fraction-static "
        f"{run.get('mem_fraction_static', '?')}`.",
        "",
        "| stage | B | status | startup s | target weights GB | drafter weights GB | KV pools GB | CUDA graphs GB "
        "| free after startup GB | nvidia-smi used GiB | ms/token | ms/step | tokens/step | draft ms | verify ms "
        "| rest ms | step ms (GPU) | break-even tau (GPU) | break-even tau (e2e) |",
        "|" + "---|" * 3 + "---:|" * 16,
    ]
    lines += [stage_row(name, stage) for name, stage in stages.items()]
    lines += ["", "## The bound at the published acceptance length (B = 16)", ""]
    b16 = stages["b16"]
    if "bounds" in b16:
        timing = b16.get("step_timing") or {}
        for name, bound in b16["bounds"].items():
            lines.append(
                f"- {name}, tau = {bound['tau']}: tau * t_AR / (t_verify + t_draft) = {bound['tau']} * {num(t_ar)} / "
                f"({num(timing.get('verify_ms'))} + {num(timing.get('draft_ms'))}) = **{num(bound['gpu'])}x**; "
                f"with our whole end-to-end step instead of t_verify + t_draft: {num(bound['e2e'])}x.")
    else:
        lines.append("- Not computed: the ar and b16 stages were not both measured.")
    lines += [
        "- B = 32 and B = 64 are cost only: no acceptance length is published for them. Their break-even tau is the "
        "acceptance length at which a step costs as much as the tokens it would have taken AR.",
        "",
        "## How this was measured",
        "",
        "- Shape: `dflash-sglang make-shape --shape gemma-4-31b` (the published Gemma-4-31B-it config.json layout: "
        "60 layers, hidden 5376, 50 sliding + 10 full attention layers, vocab 262,144, the 31B-sized vision tower) "
        "and the z-lab gemma-4-31B-it-DFlash drafter config (5 layers, 6 target features, sliding window 2048); "
        "B = 32 / 64 reuse that drafter with `block_size` changed. The real Gemma 4 tokenizer and processor config.",
        "- Weights are random (`--load-format dummy`, `--speculative-draft-load-format dummy`): a dense bf16 model "
        "costs the same per step whatever its values, but the drafter's acceptance is ~1 (tokens/step column), so "
        "speed-up is not measured, only the cost of each part of a step.",
        f"- One server at a time, `--cuda-graph-max-bs 4 --disable-prefill-cuda-graph --context-length 8192 "
        f"--sampling-backend pytorch`, overlap scheduling on. Per stage {run.get('prompts', '?')} greedy streaming "
        f"`/generate` requests of {run.get('max_tokens', '?')} tokens (`ignore_eos`) at concurrency 1 after one "
        "warm-up request.",
        "- ms/token and ms/step are client-side: time from the first streamed chunk (the prefill's token) to the "
        "last, over the tokens after the first / over the verify steps SGLang counted (`spec_verify_ct`).",
        "- draft / verify / rest / step ms are GPU times of our worker's decode step (`DFLASH_SGLANG_STEP_TIMING=1`: "
        "CUDA events around the drafter forward, the target verify forward, and acceptance + commit + next draft "
        "input; read lazily, no host sync in the step), step-weighted means of the batch-size-1 lines, the first "
        "line (warm-up) dropped. `rest` and the host gaps between steps make up the difference to ms/step.",
        "- Memory: SGLang's startup log lines (`Load weight end` per model, `KV Cache is allocated` per pool, target "
        "and draft CUDA-graph capture, `available_gpu_mem` once ready) and `nvidia-smi` while serving.",
        f"- Published tau: {', '.join(f'{k} {v}' for k, v in PUBLISHED_TAU_B16.items())} at B = 16 "
        "(z-lab/gemma-4-31B-it-DFlash, vLLM on a B300, thinking on; quoted by the issue, the table row itself not "
        "verified, see notes/dflash.md §4.2).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", help="summary.json files from gemma4_shape.sh, oldest first")
    parser.add_argument("--out-dir", default="docs/results")
    args = parser.parse_args()
    paths = [Path(p) for p in args.summaries]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such summary file: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = merge([json.loads(p.read_text()) for p in paths])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gemma4-31b-shape-{summary['date']}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{stem}.md").write_text(render(summary))
    print(out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
