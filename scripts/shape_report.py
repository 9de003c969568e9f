"""shape.sh's summary.json -> docs/results/<shape>-shape-DATE.md (+ the JSON beside it).

    python scripts/shape_report.py out/shape-qwen3-32b/summary.json [MORE.json ...] [--out-dir docs/results]

Several summaries of one shape (e.g. `--stages "ar b16 t32 t64"` in one device command, `--stages "ar t16 b32"`
in the next) are merged stage by stage: a stage measured ("ok") in a later file replaces the earlier one. The
derived numbers (our step / the AR step, the bars, the bound at the published tau) are recomputed from the merged
stages, so a ratio may set one run's step against another run's AR step: re-run `ar` in each command to avoid that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))

from shape import BARS, DEFAULT_SHAPE, PUBLISHED_TAU_B16, STAGES, TREE_TOPK, bar_lines, derive, mode_label  # noqa: E402

COMMAND = "source .device/unpack.sh && bash scripts/device/shape.sh --shape {shape}"
TITLES = {"gemma-4-31b": "Gemma-4-31B", "qwen3-32b": "Qwen3-32B"}
SHAPE_NOTES = {
    "gemma-4-31b": "`dflash-sglang make-shape --shape gemma-4-31b` (the published Gemma-4-31B-it config.json layout: "
                   "60 layers, hidden 5376, 50 sliding + 10 full attention layers, vocab 262,144, the 31B-sized "
                   "vision tower, served with `--mm-attention-backend triton_attn`) and the z-lab "
                   "gemma-4-31B-it-DFlash drafter config (5 layers, 6 target features, sliding window 2048). The "
                   "real Gemma 4 tokenizer and processor config.",
    "qwen3-32b": "`dflash-sglang make-shape --shape qwen3-32b` (Qwen3-32B's dimensions: 64 layers, hidden 5120, "
                 "64 query / 8 KV heads of 128, MLP 25,600, vocab 151,936, untied head) and a z-lab-style drafter "
                 "of 5 full-attention layers at the target's widths, 5 target features, B = 16. The real Qwen3 "
                 "tokenizer.",
}


def merge(summaries: list[dict]) -> dict:
    shapes = {s.get("shape", DEFAULT_SHAPE) for s in summaries}
    if len(shapes) > 1:
        raise ValueError(f"summaries of different shapes cannot be merged: {sorted(shapes)}")
    merged = json.loads(json.dumps(summaries[0]))
    merged["shape"] = shapes.pop()
    for summary in summaries[1:]:
        for name, stage in summary["stages"].items():
            if stage["status"] == "ok" or merged["stages"].get(name, {}).get("status") != "ok":
                merged["stages"][name] = stage
    for name, stage in merged["stages"].items():  # summaries written before tree stages existed lack `mode`
        for key, value in STAGES[name].items():
            stage.setdefault(key, value)
        if stage["mode"] == "tree":
            stage.setdefault("tree_topk", TREE_TOPK)
    merged["stages"] = {name: merged["stages"][name] for name in STAGES if name in merged["stages"]}
    derive(merged["stages"], merged["shape"])
    merged["bars"] = BARS.get(merged["shape"])
    merged["published_tau_b16"] = PUBLISHED_TAU_B16.get(merged["shape"], {})
    merged["merged_from_runs"] = [s.get("run", {}).get("started_utc") for s in summaries]
    return merged


def num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_cell(stage: dict, kind: str) -> str:
    ratio = stage.get(f"step_ratio_{kind}")
    if ratio is None:
        return "-"
    met = stage.get(f"bar_met_{kind}")
    cell = f"{ratio:.3f}x"
    return cell if met is None else f"**{cell}**" + ("" if met else " (over)")


def stage_row(name: str, stage: dict) -> str:
    memory, client, timing = stage.get("memory", {}), stage.get("client", {}), stage.get("step_timing") or {}
    weights, graphs = memory.get("weights_gb", {}), memory.get("graph_gb", {})
    smi = (client.get("gpu_memory_serving") or {}).get("used_mib")
    status = stage["status"] + (f": {stage['reason']}" if stage.get("reason") else "")
    bar = stage.get("bar")
    cells = [name, mode_label(stage), status, num(stage.get("startup_s"), 0), num(weights.get("target")),
             num(weights.get("draft")), num(memory.get("kv_total_gb") if memory.get("kv_pools") else None),
             num(sum(graphs.values()) if graphs else None), num(memory.get("available_after_startup_gb")),
             num(smi / 1024 if smi else None, 1), num(client.get("ms_per_token")), num(client.get("ms_per_step")),
             num(client.get("accept_length")), num(timing.get("draft_ms")), num(timing.get("verify_ms")),
             num(timing.get("rest_ms")), num(timing.get("step_ms")), ratio_cell(stage, "gpu"),
             ratio_cell(stage, "e2e"), "-" if bar is None else f"<= {bar:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def profile_lines(stages: dict, top: int = 8) -> list[str]:
    """The --profile section: per profiled stage, the GPU time of one decode step's kernels (graph replays
    included) and its heaviest kernels, each against AR's step where AR was profiled."""
    profiled = {name: stage["profile"] for name, stage in stages.items() if stage.get("profile")}
    if not profiled:
        return []
    ar = profiled.get("ar")
    lines = ["", "## GPU time of one decode step by kernel (`shape.sh --profile`)", "",
             "SGLang's torch profiler over 12 steps at concurrency 1 (`scripts/device/profile_step.py`): the kernels "
             "of our worker's decode step, or of an AR scheduler step that replayed the decode graph; us per step, "
             "runs per step.", ""]
    for name, profile in profiled.items():
        total = profile["gpu_kernel_us_per_step"]
        # A trace without GPU activity has steps but no kernel time: no ratio then.
        versus = (f", {total / ar['gpu_kernel_us_per_step']:.3f}x AR's"
                  if ar and ar["gpu_kernel_us_per_step"] and name != "ar" else "")
        lines.append(f"- **{name}** ({mode_label(stages[name])}): {num(total / 1000, 3)} ms of kernels per step"
                     f"{versus}, {profile['steps']} steps:")
        for kernel in profile["top_kernels_by_gpu_time"][:top]:
            lines.append(f"  - `{kernel['kernel'][:90]}`: {kernel['us_per_step']:.1f} us, "
                         f"{kernel['runs_per_step']:.1f} runs")
    return lines


def render(summary: dict) -> str:
    run, stages, shape = summary.get("run", {}), summary["stages"], summary.get("shape", DEFAULT_SHAPE)
    gpu = (run.get("gpu") or {}).get("gpu", "GPU not recorded")
    ar = stages.get("ar", {})
    t_ar = ar.get("client", {}).get("ms_per_token") if ar.get("status") == "ok" else None
    runs = [r for r in summary.get("merged_from_runs", []) if r]
    runs_note = f", merged from {len(runs)} runs ({', '.join(runs)})" if len(runs) > 1 else ""
    lines = [
        f"# {TITLES.get(shape, shape)} shape under dflash_sglang, one {gpu} ({summary['date']})",
        "",
        f"`{COMMAND.format(shape=shape)} --stages \"{' '.join(stages)}\"`{runs_note} (summary JSON beside this file). "
        f"Draft attention backend: `{run.get('draft_backend', '?')}`; target attention `triton`; bf16; "
        f"`--mem-fraction-static {run.get('mem_fraction_static', '?')}`. t_AR = AR ms/token at c1 = {num(t_ar)}.",
        "",
        "| stage | mode | status | startup s | target weights GB | drafter weights GB | KV pools GB | CUDA graphs GB "
        "| free after startup GB | nvidia-smi used GiB | ms/token | ms/step | tokens/step | draft ms | verify ms "
        "| rest ms | step ms (GPU) | step / t_AR (GPU) | step / t_AR (e2e) | bar |",
        "|" + "---|" * 3 + "---:|" * 17,
    ]
    lines += [stage_row(name, stage) for name, stage in stages.items()]
    bars = summary.get("bars")
    if bars:
        lines += ["", f"## Step cost against the bars of {bars['source']}", ""]
        lines += [f"- {line.strip()}" for line in bar_lines(summary)]
        lines += [
            "- GPU: our worker's whole decode step (CUDA events, start of the draft to the end of the commit) over "
            "t_AR, as the issue's bar reads it. e2e: the client's ms per verify step over t_AR, the same clock on "
            "both sides (it includes the host gaps between steps that the GPU figure leaves out). Bold: the bar "
            "applies; (over): above it.",
        ]
    lines += profile_lines(stages)
    published = summary.get("published_tau_b16") or {}
    if published:
        lines += ["", "## The bound at the published acceptance length (B = 16)", ""]
        b16 = stages.get("b16", {})
        if "bounds" in b16:
            timing = b16.get("step_timing") or {}
            for name, bound in b16["bounds"].items():
                lines.append(
                    f"- {name}, tau = {bound['tau']}: tau * t_AR / (t_verify + t_draft) = {bound['tau']} * "
                    f"{num(t_ar)} / ({num(timing.get('verify_ms'))} + {num(timing.get('draft_ms'))}) = "
                    f"**{num(bound['gpu'])}x**; with our whole end-to-end step instead of t_verify + t_draft: "
                    f"{num(bound['e2e'])}x.")
        else:
            lines.append("- Not computed: the ar and b16 stages were not both measured.")
        lines.append("- Chain stages other than B = 16, and tree stages, are cost only: no acceptance length is "
                     "published for them.")
    lines += [
        "",
        "## How this was measured",
        "",
        f"- Shape: {SHAPE_NOTES.get(shape, shape)} Chain stages bN serve that drafter with `block_size` N; tree "
        f"stages tN serve it at B = 16 with `--speculative-dflash-tree-budget N --speculative-dflash-topk "
        f"{run.get('tree_topk', TREE_TOPK)}` (verify width N + 1, custom-mask verify in the target's CUDA graphs).",
        "- Weights are random (`--load-format dummy`, `--speculative-draft-load-format dummy`): a dense bf16 model "
        "costs the same per step whatever its values, but the drafter's acceptance is ~1 (tokens/step column), so "
        "speed-up is not measured, only the cost of each part of a step. step / t_AR is the acceptance length at "
        "which a step breaks even with AR.",
        f"- One server at a time, `--cuda-graph-max-bs 4 --disable-prefill-cuda-graph --context-length "
        f"{flag_value(run.get('common_flags', []), '--context-length', '8192')} --sampling-backend pytorch`, "
        f"overlap scheduling on. Per stage {run.get('prompts', '?')} greedy streaming `/generate` requests of "
        f"{run.get('max_tokens', '?')} tokens (`ignore_eos`) at concurrency 1 after one warm-up request"
        + (f"; each prompt {run['prompt_tokens']} token ids (distinct per request), so every step attends over "
           f"that much context and more" if run.get("prompt_tokens") else "") + ".",
        "- ms/token and ms/step are client-side: time from the first streamed chunk (the prefill's token) to the "
        "last, over the tokens after the first / over the verify steps SGLang counted (`spec_verify_ct`).",
        "- draft / verify / rest / step ms are GPU times of our worker's decode step (`DFLASH_SGLANG_STEP_TIMING=1`: "
        "CUDA events around the drafter forward, the target verify forward, and acceptance + commit + next draft "
        "input; read lazily, no host sync in the step), step-weighted means of the batch-size-1 lines, the first "
        "line (warm-up) dropped. In tree mode `draft` also holds the top-k head and the tree build, and `rest` the "
        "tree acceptance, slot reorder and feature gather. `rest` and the host gaps between steps make up the "
        "difference to ms/step.",
        "- Memory: SGLang's startup log lines (`Load weight end` per model, `KV Cache is allocated` per pool, target "
        "and draft CUDA-graph capture, `available_gpu_mem` once ready) and `nvidia-smi` while serving.",
    ]
    if published:
        lines.append(
            f"- Published tau: {', '.join(f'{k} {v}' for k, v in published.items())} at B = 16 "
            "(z-lab/gemma-4-31B-it-DFlash, vLLM on a B300, thinking on; quoted by the issue, the table row itself not "
            "verified).")
    return "\n".join(lines) + "\n"


def flag_value(flags: list[str], name: str, default: str) -> str:
    """The value after `name` in a server's flag list, else `default`."""
    return flags[flags.index(name) + 1] if name in flags[:-1] else default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", help="summary.json files from shape.sh, oldest first")
    parser.add_argument("--out-dir", default="docs/results")
    args = parser.parse_args()
    paths = [Path(p) for p in args.summaries]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such summary file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        summary = merge([json.loads(p.read_text()) for p in paths])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{summary['shape']}-shape-{summary['date']}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{stem}.md").write_text(render(summary))
    print(out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
